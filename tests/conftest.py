"""Shared test settings: tiny models, a per-session cache, no network."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A laptop-of-a-laptop model: trains a step in milliseconds.
TINY = ["model.preset=gpt_tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.max_positions=64",
        "data.block_size=32", "data.eval_blocks=16", "train.micro_batch_size=8", "train.log_every=1",
        "train.progress=false", "optim.warmup_steps=5", "optim.lr=3e-3"]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One tokenization cache for the whole session (tokenizing the corpus once)."""
    os.environ["LMSSL_CACHE"] = str(tmp_path_factory.mktemp("lmssl_cache"))
    yield


@pytest.fixture
def tiny() -> list[str]:
    return list(TINY)


def python_cmd() -> list[str]:
    return [sys.executable, "-m", "lmssl"]
