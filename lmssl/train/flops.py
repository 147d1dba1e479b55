"""FLOP accounting and device peaks for MFU."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from lmssl.data.files import cache_dir

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s), matched by substring.
GPU_PEAKS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
    "A800": 312e12, "A6000": 155e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12,
    "3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s of ``device`` and where the figure comes from.

    GPU: the datasheet bf16 dense figure. CPU: a measured fp32 GEMM peak. One short
    measurement on a CPU that is still ramping its clock, or shared with other work, reads
    low (on the 2-core test machine single readings range from 0.09 to 0.17 TFLOP/s), which
    would put MFU above 100%; so the best figure ever measured for this CPU model and
    thread count is kept in the cache folder and the peak is the larger of it and today's.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS.items():
            if key in name:
                return peak, f"{name} datasheet bf16"
        return 0.0, f"{name} (peak unknown)"
    measured = measure_gemm_flops()
    record = cache_dir() / "cpu_peak.json"
    key = f"{_cpu_name()}|{torch.get_num_threads()} threads|torch {torch.__version__}"
    try:
        known = json.loads(record.read_text()) if record.is_file() else {}
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    best = max(measured, float(known.get(key, 0.0)))
    if best > float(known.get(key, 0.0)):
        known[key] = best
        try:  # a cache that cannot be written only costs the memory of a better reading
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, record)
        except OSError:
            pass
    return best, "measured CPU fp32 GEMM, best seen on this CPU"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def measure_gemm_flops(n: int = 1024, warmup_s: float = 0.2, measure_s: float = 0.3) -> float:
    """Best fp32 matmul throughput over ``n x n`` products (FLOP/s), after ``warmup_s`` of
    untimed products that bring the cores up to their working clock."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        a @ b
    best = float("inf")
    end = time.perf_counter() + measure_s
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
