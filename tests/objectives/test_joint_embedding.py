"""SimCLR, BYOL and VICReg beyond the conformance test: BYOL's target takes no gradient and
follows the EMA rule (and stands still after a skipped step), a run killed with SIGKILL
resumes bit-identically (EMA target included), and a collapsed embedding trips the monitor's
warning line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lmssl import objectives
from lmssl.config import load_config
from lmssl.data import build_data
from lmssl.data.batches import to_device
from lmssl.models.ema import cosine_momentum, ema_update_
from lmssl.train.log import read_log
from tests.conftest import ROOT
from tests.objectives.test_conformance import smoke_overrides


def smoke(name: str, *extra: str):
    cls = objectives.get(name)
    return load_config(ROOT / "recipes" / f"{cls.recipe}.yaml", smoke_overrides(name) + list(extra))


def first_batch(cfg, objective):
    data = build_data(cfg, type(objective), None, log=lambda m: None)
    return to_device(next(data.stream(cfg, 0, 0, 1))[0], "cpu"), data


def test_byol_target_takes_no_gradient_and_follows_the_ema_rule():
    cfg = smoke("byol")
    torch.manual_seed(0)
    byol = objectives.build(cfg, None)
    batch, _ = first_batch(cfg, byol)
    loss, _ = byol(batch)
    loss.backward()
    assert all(p.grad is None for p in byol.target_backbone.parameters())
    assert all(p.grad is None for p in byol.target_projector.parameters())
    assert any(p.grad is not None for p in byol.backbone.parameters())
    opt = torch.optim.SGD([p for p in byol.parameters() if p.requires_grad], lr=0.5)
    before = [p.detach().clone() for p in byol.target_backbone.parameters()]
    opt.step()
    byol.after_step(3, torch.zeros(()))
    m = cosine_momentum(3, cfg.train.max_steps, cfg.byol.base_momentum, cfg.byol.final_momentum)
    for old, online, new in zip(before, byol.backbone.parameters(), byol.target_backbone.parameters()):
        torch.testing.assert_close(new, m * old + (1 - m) * online.detach(), rtol=1e-6, atol=1e-7)
    frozen = [p.detach().clone() for p in byol.target_backbone.parameters()]
    byol.after_step(4, torch.ones(()))  # a skipped step: the target stands still
    assert all(torch.equal(a, b) for a, b in zip(frozen, byol.target_backbone.parameters()))


def test_ema_momentum_schedule_and_buffers():
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    online, target = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    online.running_mean.fill_(2.0)
    ema_update_(target, online, 0.9)
    assert torch.equal(target.running_mean, online.running_mean)  # buffers are copied, not averaged


def test_collapsed_embedding_trips_the_warning():
    cfg = smoke("simclr", "monitor.bank_images=64", "monitor.query_images=64")
    torch.manual_seed(0)
    simclr = objectives.build(cfg, None)
    _, data = first_batch(cfg, simclr)
    lines = []
    start = simclr.eval_metrics({}, data, lines.append)  # a random network: low spread, but where runs start
    assert not lines and start["effective_rank"] > 2
    with torch.no_grad():  # every image maps to the same feature: a collapsed backbone
        simclr.backbone.core.norm.weight.zero_()
        simclr.backbone.core.norm.bias.fill_(1.0)
    collapsed = simclr.eval_metrics({}, data, lines.append)
    assert collapsed["effective_rank"] < 1.5 and len(lines) == 1 and "collapsing" in lines[0]


def command(out):
    cls = objectives.get("byol")
    return [sys.executable, "-m", "lmssl", "pretrain", str(ROOT / "recipes" / f"{cls.recipe}.yaml"),
            *smoke_overrides("byol"), f"train.output_dir={out}", "train.max_steps=8", "train.save_every=2",
            "train.micro_batch_size=16"]


def test_byol_resumes_bit_identically_after_sigkill(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(command(reference), cwd=ROOT, env=env, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        rows = read_log(killed / "log.jsonl") if (killed / "log.jsonl").exists() else []
        if rows and rows[-1].get("step", 0) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    subprocess.run(command(killed), cwd=ROOT, env=env, check=True, capture_output=True)  # the same command again
    a = load_file(str(reference / "checkpoints" / "step_0000008" / "model.safetensors"))
    b = load_file(str(killed / "checkpoints" / "step_0000008" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("target_backbone.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
