"""Host memory: keep what a training step frees for the next step to reuse.

glibc's malloc hands large freed blocks back to the operating system (``munmap`` for
blocks above its mmap threshold, a heap trim above its trim threshold). A training step
frees and re-allocates activations of the same sizes every step, so the next step maps
fresh pages, and the kernel zero-fills each 4 KiB page on first touch. On a CPU that is
thousands of minor page faults a step: measured on the project's 2-core machine,
gpt_tiny at 8 x 256 tokens takes 5-9k a step (about 35 ms of a 500 ms step), and
``GPT2LMHeadModel`` of the same shape about 67k (``lmssl bench`` prints both).

:func:`keep_freed_memory` raises both thresholds with ``mallopt`` so freed memory stays in
the process and is reused: the resident size stays at the run's high-water mark instead of
rising and falling every step. ``lmssl pretrain`` and ``lmssl finetune`` call it; it does
nothing off glibc (macOS, Windows, musl) or when the environment already chooses the
allocator's settings (``MALLOC_*``, ``GLIBC_TUNABLES``, or an ``LD_PRELOAD``-ed allocator
such as jemalloc or tcmalloc).
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap, not from their own mapping
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int argument takes: never trim


def allocator_settings() -> list[str]:
    """The allocator choices this process's environment makes, as ``NAME=value`` strings."""
    return [f"{k}={v}" for k, v in sorted(os.environ.items())
            if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")]


def keep_freed_memory() -> bool:
    """Keep freed memory in the process (glibc on Linux); True when the settings took."""
    if not sys.platform.startswith("linux") or allocator_settings():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
