"""Steps with a non-finite loss or gradient are skipped on the device: weights, AdamW moments
and step counts stay as they were, and the loop counts them when it next logs or saves."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmssl.config import load_config
from lmssl.runs import checkpoint as ckpt
from lmssl.train.loop import train
from lmssl.train.optim import step_unless
from tests.conftest import ROOT, TINY


def optimizer_and_params(fused: bool) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    return torch.optim.AdamW(params, lr=0.1, fused=fused or None, foreach=None if fused else False), params


def snapshot(opt, params) -> list[torch.Tensor]:
    state = [t.clone() for p in params for t in opt.state[p].values()]
    return [p.detach().clone() for p in params] + state


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "per-tensor"])
def test_step_unless_skips_exactly_and_steps_otherwise(fused):
    opt, params = optimizer_and_params(fused)
    for p in params:
        p.grad = torch.ones_like(p)
    step_unless(opt, torch.zeros(()))  # a finite step: everything moves
    before = snapshot(opt, params)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    step_unless(opt, torch.ones(()))  # skipped: nothing moves, NaN gradients included
    after = snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not hasattr(opt, "found_inf")
    for p in params:
        p.grad = torch.ones_like(p)
    step_unless(opt, torch.zeros(()))
    assert not torch.equal(params[0], before[0]) and int(opt.state[params[0]]["step"]) == 2


def test_a_diverged_run_skips_its_bad_steps_and_keeps_finite_weights(tmp_path, capsys):
    out = tmp_path / "run"
    # an absurd learning rate: the first step leaves huge weights, after which every loss is inf or NaN
    cfg = load_config(ROOT / "recipes" / "gpt_tiny.yaml",
                      TINY + [f"train.output_dir={out}", "train.max_steps=8", "train.eval_every=0",
                              "train.save_every=4", "train.sample_tokens=2", "optim.lr=1e30", "optim.warmup_steps=1",
                              "train.grad_clip=0", "train.max_bad_steps=100"])
    train(cfg)
    err = capsys.readouterr().err
    assert "non-finite loss or gradient skipped" in err and "no end-of-run report" in err
    saved = {}
    for step in (4, 8):
        path = out / "checkpoints" / f"step_{step:07d}"
        saved[step] = load_file(path / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in saved[step].values())
        bad = ckpt.load_trainer_state(path)["bad_steps"]
        assert 0 < bad <= step
    # every step after the 4th was skipped, so the weights did not move
    assert all(torch.equal(saved[4][k], saved[8][k]) for k in saved[4])
    assert ckpt.load_trainer_state(out / "checkpoints" / "step_0000008")["bad_steps"] == \
        ckpt.load_trainer_state(out / "checkpoints" / "step_0000004")["bad_steps"] + 4


def test_gradient_norms_of_every_kind_become_one_device_scalar():
    from lmssl.train.loop import _device_scalar

    like = torch.tensor(3.0, dtype=torch.bfloat16)
    for value, expected in ((None, 0.0), (2.5, 2.5), (torch.tensor(4.0, dtype=torch.float64), 4.0)):
        out = _device_scalar(value, like)  # DeepSpeed gives a float, no clipping gives None
        assert out.shape == () and out.dtype == torch.float32 and float(out) == expected


def test_nan_gradients_under_a_finite_loss_are_skipped_without_clipping(tmp_path, capsys, monkeypatch):
    """Fault injection: one weight's gradient is made NaN in every step while the loss stays
    finite; with train.grad_clip=0 nothing else would look at the gradients."""
    import lmssl.objectives as objectives

    build = objectives.build

    def build_with_a_poisoned_gradient(cfg, tokenizer):
        model = build(cfg, tokenizer)
        next(model.parameters()).register_hook(lambda g: torch.full_like(g, float("nan")))
        return model

    monkeypatch.setattr(objectives, "build", build_with_a_poisoned_gradient)
    out = tmp_path / "run"
    cfg = load_config(ROOT / "recipes" / "gpt_tiny.yaml",
                      TINY + [f"train.output_dir={out}", "train.max_steps=4", "train.eval_every=0",
                              "train.save_every=2", "train.sample_tokens=2", "train.grad_clip=0",
                              "train.max_bad_steps=100"])
    train(cfg)
    first, last = (load_file(out / "checkpoints" / f"step_{s:07d}" / "model.safetensors") for s in (2, 4))
    assert all(torch.isfinite(t).all() for t in last.values())
    assert all(torch.equal(first[k], last[k]) for k in first)  # every step skipped: nothing moved
    assert ckpt.load_trainer_state(out / "checkpoints" / "step_0000004")["bad_steps"] == 4
