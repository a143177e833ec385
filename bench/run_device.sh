#!/usr/bin/env bash
# One accelerator-machine session for issue 6: environment check, the GPU tests of the speed path,
# then bench_train.py (reference and speed paths in the same process tree, same card).
# Usage (on the device, after installing .whl/ as ../shared/tools/device-wheels.sh prints):
#   bash bench/run_device.sh [CONFIGS] [STEPS]        # writes everything under $OUT
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_NO_ADVISORY_WARNINGS=1 PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True TORCH_LOGS=recompiles BENCH_PROFILE=${BENCH_PROFILE:-fast}
card=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1)
echo "card: $card"
if [[ -z "${1:-}" ]]; then
  configs=reference,fast,fast-ckpt,small
else configs=$1; fi
python3 -c 'import torch, transformers, trl, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__, "bnb", bitsandbytes.__version__)'
[[ -n "${GPU_TESTS:-}" ]] && timeout 240 python3 -m pytest -q -m gpu tests/test_fast.py -k "True" -p no:cacheprovider 2>&1 | tail -15
timeout "${BENCH_TIMEOUT:-480}" python3 bench/bench_train.py --configs "$configs" --steps "${2:-5}" --warmup 2 \
  --timeout 200 --out "$OUT"
