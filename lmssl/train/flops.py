"""FLOP accounting and device peaks for MFU."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from lmssl.config import ModelConfig

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), matched by substring.
GPU_PEAKS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "A6000": 155e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
    "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def transformer_flops_per_token(cfg: ModelConfig, non_embedding_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): ``6 N`` for the weight
    matrices including the vocabulary projection, plus ``12 L T d`` for attention scores."""
    vocab_proj = cfg.dim * cfg.vocab_size
    return 6.0 * (non_embedding_params + vocab_proj) + 12.0 * cfg.n_layers * seq_len * cfg.dim


def cache_dir() -> Path:
    return Path(os.environ.get("LMSSL_CACHE", Path.home() / ".cache" / "lmssl"))


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s of ``device`` and where the figure comes from.

    GPU: the datasheet bf16 dense figure. CPU: a measured fp32 GEMM peak (1024^3 matmuls
    on all threads, about a tenth of a second), measured afresh each run.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"{name} datasheet bf16"
        return 0.0, f"{name} (peak unknown)"
    return measure_gemm_flops(), "measured CPU fp32 GEMM"


def measure_gemm_flops(n: int = 1024, repeats: int = 8) -> float:
    """Best fp32 matmul throughput over a few ``n x n`` products (FLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
