"""Two CPU processes through torchrun (Accelerate's multi-CPU mode, gloo): the same recipe
trains, and a run started with one process resumes with two on the same global batch,
seeing the same samples in the same global order (equal losses up to summation order)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

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


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank``."""
    children = open(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read().split()
    for pid in children:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads torchrun's workers from /proc")
def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [shutil.which("torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           *args(out, "train.max_steps=400", "train.save_every=0")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and len(losses(out) if (out / "log.jsonl").exists() else ()) < 5 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(worker_of_rank(proc.pid, 1), signal.SIGTERM)  # rank 0, which saves, never sees the signal itself
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by signal at step" in output
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(saved) == 1 and 5 <= int(saved[0][5:]) < 400
    done = torchrun(out, "train.max_steps=" + str(int(saved[0][5:]) + 3), "train.save_every=0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr and max(losses(out)) == int(saved[0][5:]) + 3
