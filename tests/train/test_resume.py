"""Kill-and-resume: a run killed at arbitrary moments (SIGKILL, also mid-save) and restarted
with the same command continues exactly as an uninterrupted run (bit-identical on CPU)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from lmssl.train.log import read_log
from tests.conftest import ROOT, TINY

STEPS = 40


def command(out, save_every):
    return [sys.executable, "-m", "lmssl", "pretrain", str(ROOT / "recipes" / "gpt_tiny.yaml"), *TINY,
            f"train.output_dir={out}", f"train.max_steps={STEPS}", f"train.save_every={save_every}",
            "train.eval_every=0", "train.sample_tokens=2", "model.dropout=0.1"]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def losses(out):
    return {r["step"]: r["loss"] for r in read_log(out / "log.jsonl") if "loss" in r}


def last_step(out):
    rows = read_log(out / "log.jsonl") if (out / "log.jsonl").exists() else []
    return rows[-1]["step"] if rows else 0


def run_and_kill(out, save_every, at_step, sig=signal.SIGKILL, extra_delay=0.0):
    """Start the run, wait until it has logged ``at_step``, then send ``sig``."""
    proc = subprocess.Popen(command(out, save_every), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and last_step(out) < at_step and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(extra_delay)
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output


def final_weights(out):
    return load_file(str(out / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    subprocess.run(command(out, 10), cwd=ROOT, env=env(), check=True, capture_output=True)
    return losses(out), final_weights(out)


def test_sigkill_at_random_steps_resumes_bit_identically(tmp_path, reference):
    ref_losses, ref_weights = reference
    rng = random.Random(1234)
    kills = sorted(rng.sample(range(6, STEPS - 4), 3))
    for at in kills:
        code, _ = run_and_kill(tmp_path, 5, at, extra_delay=rng.uniform(0, 0.05))
        assert code == -signal.SIGKILL
    done = subprocess.run(command(tmp_path, 5), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr + done.stdout
    assert losses(tmp_path) == ref_losses  # every step, exact
    got = final_weights(tmp_path)
    assert all((got[k] == ref_weights[k]).all() for k in ref_weights)


def test_sigkill_during_saves_never_leaves_the_run_unresumable(tmp_path, reference):
    ref_losses, _ = reference
    rng = random.Random(99)
    for at in (4, 11, 23):  # save at every step: kills land inside saves often
        run_and_kill(tmp_path, 1, at, extra_delay=rng.uniform(0, 0.03))
        leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
        assert all(".tmp" in name or ".old" in name for name in leftovers)
    done = subprocess.run(command(tmp_path, 1), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(tmp_path) == ref_losses


def test_sigint_saves_and_exits_cleanly(tmp_path, reference):
    code, output = run_and_kill(tmp_path, 100, 7, sig=signal.SIGINT)
    assert code == 0, output[-2000:]
    assert "Run the same command again to resume" in output
    done = subprocess.run(command(tmp_path, 100), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert done.returncode == 0
    assert losses(tmp_path) == reference[0]


def test_corrupt_latest_checkpoint_falls_back(tmp_path, reference):
    subprocess.run(command(tmp_path, 10), cwd=ROOT, env=env(), check=True, capture_output=True)
    latest = tmp_path / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    from lmssl.runs.checkpoint import find_resumable

    messages = []
    found = find_resumable(tmp_path, messages.append)
    assert found.step == STEPS - 10
    assert "fails its checksum" in messages[0] and "falling back" in messages[0]
