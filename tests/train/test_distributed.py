"""Two CPU processes through torchrun (Accelerate's multi-CPU mode, gloo): the same recipe
trains, and a run started with one process resumes with two on the same global batch,
seeing the same samples in the same global order (equal losses up to summation order)."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from lmssl.train.log import read_log
from tests.conftest import ROOT, TINY
from tests.train.test_resume import run_and_kill

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


def args(out, *extra):
    return ["-m", "lmssl", "pretrain", str(ROOT / "recipes" / "gpt_tiny.yaml"), *TINY, f"train.output_dir={out}",
            "train.max_steps=30", "train.save_every=5", "train.eval_every=0", "train.sample_tokens=2",
            "train.micro_batch_size=4", *extra]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(out, *extra):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [shutil.which("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           *args(out, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)


def losses(out):
    return {r["step"]: r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r}


def test_one_to_two_processes_resume_same_global_batches(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, *args(reference, "train.grad_accum=2")], cwd=ROOT, env=env(), check=True,
                   capture_output=True, timeout=300)
    resumed = tmp_path / "resumed"
    import tests.train.test_resume as one_process

    original = one_process.command
    one_process.command = lambda out, save_every: [sys.executable, *args(out, "train.grad_accum=2")]
    try:
        run_and_kill(resumed, 5, 12)
    finally:
        one_process.command = original
    done = torchrun(resumed, "train.grad_accum=1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    ref, got = losses(reference), losses(resumed)
    assert sorted(got) == sorted(ref) == list(range(1, 31))
    assert ref[30] < ref[1] - 1.0  # it learned
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=2e-4, abs=2e-4), step
