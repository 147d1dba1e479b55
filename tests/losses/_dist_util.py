"""Shared machinery of the 2-process CPU (gloo) loss tests (not a test itself).

Test side: :func:`run_workers` starts one interpreter per rank on a worker script, like
torchrun would, and returns what each rank saved. Worker side: :func:`process_group`
joins the gloo group through a file store in the work directory.

Protocol: the test writes ``WORKDIR/inputs.pt``; each worker is started as
``python WORKER WORKDIR WORLD_SIZE RANK`` and writes ``WORKDIR/rank{RANK}.pt``.
Separate interpreters rather than forked children: fork after torch has started its
thread pools can hang.
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_workers(worker: Path, workdir: Path, world: int, timeout: float = 90.0) -> list[dict]:
    """Run ``worker`` once per rank on ``workdir``; return each rank's saved dict, rank order."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(workdir), str(world), str(rank)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(world)
    ]
    try:
        for rank, proc in enumerate(procs):
            log = proc.communicate(timeout=timeout)[0]
            assert proc.returncode == 0, f"rank {rank} failed:\n{log}"
    finally:
        for proc in procs:  # a rank that died leaves the other waiting in a collective
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [torch.load(workdir / f"rank{r}.pt") for r in range(world)]


def worker_args() -> tuple[Path, int, int]:
    """``(workdir, world, rank)`` from a worker's command line."""
    return Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])


@contextmanager
def process_group(workdir: Path, world: int, rank: int) -> Iterator[None]:
    """Join the CPU gloo group of ``world`` ranks; on a clean exit wait for every rank first."""
    faulthandler.dump_traceback_later(60, exit=True)  # a hang prints its stack, then exits
    torch.set_num_threads(1)
    # a file store, not a TCP one: no rank hosts it, so no rank's exit can pull it from under another
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir / 'store'}", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        yield
        dist.barrier()  # every rank done with every collective before any tears down
    finally:
        dist.destroy_process_group()
