"""Disk full while saving, planted Hub tokens, and what a checkpoint may contain."""

import os
import resource
import signal
import subprocess
import sys

from lmssl.runs.checkpoint import find_resumable, verify
from tests.conftest import ROOT, TINY


def run(out, *extra, limit_bytes=None, env_extra=None):
    def limit():
        if limit_bytes:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG errors instead of being killed
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    cmd = [sys.executable, "-m", "lmssl", "pretrain", str(ROOT / "recipes" / "gpt_tiny.yaml"), *TINY,
           f"train.output_dir={out}", "train.eval_every=0", "train.sample_tokens=2", *extra]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env_extra or {})}, capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)


def test_disk_full_during_save_fails_cleanly_and_keeps_earlier_checkpoints(tmp_path):
    assert run(tmp_path, "train.max_steps=3").returncode == 0
    full = run(tmp_path, "train.max_steps=6", limit_bytes=1_000_000)  # smaller than one weights file
    errors = [line for line in full.stderr.splitlines() if "error:" in line]
    assert full.returncode == 2, full.stderr[-2000:]
    assert len(errors) == 1 and "could not write checkpoint step 6" in errors[0] and "intact" in errors[0]
    good = find_resumable(tmp_path)
    assert good.step == 3 and verify(good.path) is None
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no debris
    assert run(tmp_path, "train.max_steps=6").returncode == 0  # and it resumes once there is space


def test_hub_token_never_reaches_the_run_directory(tmp_path):
    planted = "hf_plantedTOKEN0123456789abcdefXYZ"
    done = run(tmp_path, "train.max_steps=2", env_extra={"HF_TOKEN": planted, "HUGGING_FACE_HUB_TOKEN": planted})
    assert done.returncode == 0
    assert planted not in done.stdout + done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert planted.encode() not in path.read_bytes(), path


def test_optimizer_state_loads_without_unpickling_code(tmp_path):
    import torch

    assert run(tmp_path, "train.max_steps=2").returncode == 0
    state = torch.load(find_resumable(tmp_path).path / "optimizer.pt", weights_only=True)
    assert "state" in state and "param_groups" in state
