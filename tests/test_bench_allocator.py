"""`lmssl bench --keep-freed-memory`: with keep_freed_memory, re-allocating a freed block costs no page faults.

Each case runs in a fresh interpreter: the allocator's settings are process-wide.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")

# allocate, touch and free a 48 MiB block (above glibc's largest dynamic mmap threshold) 10 times
SCRIPT = """
import resource, sys, torch
from lmssl.bench import keep_freed_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def cycle():
    before = faults()
    for _ in range(10):
        x = torch.empty(12 * 2**20)
        x.fill_(1.0)
        del x
    return faults() - before

first = cycle()
kept = keep_freed_memory()
cycle()  # the first cycle after the change maps the block once more
print(first, kept, cycle())
"""


def _run(env: dict[str, str]) -> tuple[int, bool, int]:
    clean = {k: v for k, v in os.environ.items()
             if not (k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), out[1] == "True", int(out[2])


def test_keep_freed_memory_stops_page_faults_on_reallocation():
    default, kept, after = _run({})
    assert kept
    assert default > 10 * 10_000  # 12k pages of 4 KiB, faulted in again on every one of the 10 cycles
    assert after < 1_000  # the freed block stays in the process and is reused


def test_keep_freed_memory_leaves_an_allocator_chosen_by_the_environment_alone():
    _, kept, after = _run({"MALLOC_ARENA_MAX": "2"})
    assert not kept and after > 10 * 10_000
