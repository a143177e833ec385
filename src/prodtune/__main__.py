"""`python -m prodtune` (and `accelerate launch -m prodtune train ...`)."""

import sys

from prodtune.cli import main

sys.exit(main())
