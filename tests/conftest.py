"""Shared fixtures: tiny offline models and the shipped sample data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-init Phi-3 (hidden 64, 2 layers) with a Phi-3-style tokenizer, saved to disk."""
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-phi3"), "phi3")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random-init Llama of the same size (separate q/k/v, gate/up)."""
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def sample_raw() -> Path:
    """The shipped 500 real records in trn.json line format."""
    return ROOT / "data" / "sample" / "trn.json"
