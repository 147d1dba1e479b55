"""LARS against the update written out by hand, its trust-ratio edge cases, device-side skipped
steps (alone and driven by torch.amp.GradScaler), resume, and a regression it solves."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmssl.objectives import decay_groups
from lmssl.train.lars import LARS


def lars_param_groups(model, weight_decay):
    return decay_groups(model.parameters(), weight_decay)


def reference_step(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, *, lr: float, momentum: float, wd: float,
                   eta: float, eps: float, exclude: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One LARS step written from the formula: ``(w, buf) -> (w', buf')``."""
    if exclude:
        d = g
    else:
        w_norm, g_norm = w.pow(2).sum().sqrt(), g.pow(2).sum().sqrt()
        trust = eta * w_norm / (g_norm + wd * w_norm + eps) if w_norm > 0 and g_norm > 0 else 1.0
        d = trust * (g + wd * w)
    buf = momentum * buf + d
    return w - lr * buf, buf


def two_groups(seed: int = 0, dtype=torch.float64) -> tuple[nn.Parameter, nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return (nn.Parameter(torch.randn(4, 3, generator=gen, dtype=dtype)),
            nn.Parameter(torch.randn(3, generator=gen, dtype=dtype)))


@pytest.mark.parametrize("momentum,wd", [(0.9, 0.1), (0.9, 0.0), (0.0, 0.05)])
def test_steps_match_the_formula(momentum, wd):
    w, b = two_groups()
    lr, eta, eps = 0.3, 0.02, 1e-8
    # b gets a weight decay in its group that lars_exclude must ignore
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.5}],
               lr=lr, momentum=momentum, weight_decay=wd, eta=eta, eps=eps)
    ref = {"w": (w.detach().clone(), torch.zeros_like(w)), "b": (b.detach().clone(), torch.zeros_like(b))}
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        w.grad, b.grad = torch.randn(4, 3, generator=gen, dtype=w.dtype), torch.randn(3, generator=gen, dtype=b.dtype)
        grads = (w.grad.clone(), b.grad.clone())
        opt.step()
        ref["w"] = reference_step(*ref["w"][:1], grads[0], ref["w"][1], lr=lr, momentum=momentum, wd=wd, eta=eta,
                                  eps=eps, exclude=False)
        ref["b"] = reference_step(*ref["b"][:1], grads[1], ref["b"][1], lr=lr, momentum=momentum, wd=0.0, eta=eta,
                                  eps=eps, exclude=True)
        torch.testing.assert_close(w.detach(), ref["w"][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b.detach(), ref["b"][0], rtol=1e-12, atol=1e-14)
        assert torch.equal(w.grad, grads[0]) and torch.equal(b.grad, grads[1])  # gradients are read, not written
        if momentum:
            torch.testing.assert_close(opt.state[w]["momentum_buffer"], ref["w"][1], rtol=1e-12, atol=1e-14)
        else:
            assert not opt.state[w]


def test_trust_ratio_is_one_for_zero_weights_or_zero_gradients():
    lr, wd = 0.5, 0.1
    zero_w = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    zero_g = nn.Parameter(torch.full((3, 2), 2.0, dtype=torch.float64))
    opt = LARS([zero_w, zero_g], lr=lr, momentum=0.9, weight_decay=wd, eta=0.001)
    g = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    zero_w.grad, zero_g.grad = g.clone(), torch.zeros(3, 2, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(zero_w.detach(), -lr * g, rtol=0, atol=1e-15)  # d = 1 * (g + wd * 0)
    torch.testing.assert_close(zero_g.detach(), torch.full((3, 2), 2.0 - lr * wd * 2.0, dtype=torch.float64),
                               rtol=0, atol=1e-15)  # d = 1 * (0 + wd * w)
    # both zero: nothing moves, nothing turns NaN
    both = nn.Parameter(torch.zeros(2, 2))
    both.grad = torch.zeros(2, 2)
    LARS([both], lr=1.0, weight_decay=0.1).step()
    assert torch.equal(both.detach(), torch.zeros(2, 2))


def snapshot(opt: LARS, params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params] + [t.clone() for p in params for t in opt.state[p].values()]


def fill_grads(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


def test_a_skipped_step_leaves_weights_and_buffers_bit_identical():
    params = two_groups(dtype=torch.float32)
    opt = LARS(lars_param_groups(nn.ParameterList(params), 0.01), lr=0.2, eta=0.02)
    twin_params = [nn.Parameter(p.detach().clone()) for p in params]
    twin = LARS(lars_param_groups(nn.ParameterList(twin_params), 0.01), lr=0.2, eta=0.02)
    opt.found_inf = torch.ones(())
    fill_grads(params, 0)
    opt.step()  # a skipped first step: the buffers it creates are zeros, the weights are untouched
    assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
    for seed in (1, 2):
        opt.found_inf = torch.zeros(())  # a flag that is clear gives the very step of an optimizer without one
        fill_grads(params, seed), fill_grads(twin_params, seed)
        opt.step(), twin.step()
        assert all(torch.equal(a, b) for a, b in zip(snapshot(opt, params), snapshot(twin, twin_params)))
    before = snapshot(opt, params)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(opt, params)))
    del opt.found_inf
    fill_grads(params, 3)
    opt.step()
    assert not torch.equal(params[0], before[0])


def test_grad_scaler_unscales_and_skips_on_the_device():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    twin = copy.deepcopy(model)
    opt, twin_opt = (LARS(lars_param_groups(m, 0.01), lr=0.1, eta=0.02) for m in (model, twin))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(8, 5)
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)  # LARS unscales (grad_scale) itself: no unscale_ pass, no host read of found_inf
    scaler.update()
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    twin(x).pow(2).mean().backward()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = snapshot(opt, list(model.parameters()))
    opt.zero_grad()
    scaler.scale(model(x * float("inf")).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(opt, list(model.parameters()))))
    assert scaler.get_scale() == 2.0 ** 9
    # unscale_ first (to clip): the scaler then passes grad_scale=None and only the flag
    opt.zero_grad(), twin_opt.zero_grad()
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    twin(x).pow(2).mean().backward()
    twin_opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    opt = LARS(lars_param_groups(model, 1e-3), lr=0.1, eta=0.02)
    x, y = torch.randn(16, 6), torch.randn(16, 1)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            (m(x) - y).pow(2).mean().backward()
            o.step()

    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    resumed = nn.Sequential(nn.Linear(6, 4), nn.LayerNorm(4), nn.Linear(4, 1))
    resumed.load_state_dict(saved_model)
    resumed_opt = LARS(lars_param_groups(resumed, 0.5), lr=7.0)  # hyper-parameters come from the state dict
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[1]["lars_exclude"] and resumed_opt.param_groups[0]["eta"] == 0.02
    train(model, opt, 3), train(resumed, resumed_opt, 3)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], resumed_opt.state[q]["momentum_buffer"])
               for p, q in zip(model.parameters(), resumed.parameters()))


def test_lars_fits_a_small_regression():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = x @ torch.randn(10, 1, generator=gen) + 0.5
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = LARS(lars_param_groups(model, 1e-4), lr=1.0, eta=0.02)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_param_groups_adapt_matrices_and_exclude_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 4))
    tied = nn.Linear(8, 4, bias=False)
    tied.weight = model[3].weight  # counted once
    model.append(tied)
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    adapted, excluded = lars_param_groups(model, 0.1)
    assert [tuple(p.shape) for p in adapted["params"]] == [(8, 3, 3, 3), (4, 8)]
    # the conv bias, BN scale and shift, the linear bias
    assert [tuple(p.shape) for p in excluded["params"]] == [(8,), (8,), (8,), (4,)]
    assert (adapted["weight_decay"], adapted["lars_exclude"]) == (0.1, False)
    assert (excluded["weight_decay"], excluded["lars_exclude"]) == (0.0, True)


def test_bad_hyper_parameters_raise():
    p = [nn.Parameter(torch.zeros(2, 2))]
    for kwargs in ({"lr": -1.0}, {"lr": 0.1, "momentum": 1.0}, {"lr": 0.1, "eta": 0.0},
                   {"lr": 0.1, "weight_decay": -1e-4}):
        with pytest.raises(ValueError, match="out of range"):
            LARS(p, **kwargs)
    sparse = nn.Parameter(torch.zeros(3, 2))
    sparse.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        LARS([sparse], lr=0.1).step()


def test_weight_decay_schedule_follows_a_cosine_and_spares_undecayed_groups():
    from lmssl.config import OptimConfig
    from lmssl.train.optim import make_optimizer, make_schedule, weight_decay_at

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    cfg = OptimConfig(name="lars", lr=0.1, weight_decay=0.04, weight_decay_end=0.4, warmup_steps=0)
    opt = make_optimizer(decay_groups(model.parameters(), cfg.weight_decay), cfg)
    sched = make_schedule(opt, cfg, 10)
    seen = []
    for _ in range(10):
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["weight_decay"])
    assert seen[-1] == pytest.approx(0.4) and seen == sorted(seen)
    assert seen[4] == pytest.approx(weight_decay_at(5, 0.04, 0.4, 10))
    assert opt.param_groups[1]["weight_decay"] == 0.0  # biases and norms stay undecayed
