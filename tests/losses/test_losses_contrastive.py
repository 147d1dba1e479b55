"""InfoNCE / NT-Xent against naive loop formulations, plus behaviour and error tests."""

from __future__ import annotations

import math

import pytest
import torch

from lmssl.losses import (
    InfoNCELoss,
    LearnedTemperature,
    NTXentLoss,
    gather_with_grad,
    info_nce,
    info_nce_with_accuracy,
    nt_xent,
    nt_xent_with_accuracy,
    rank_offset,
    similarity_logits,
)

# ------------------------------------------------------------ naive references
# Written from the papers' definitions with scalar loops, sharing no code with lmssl.


def _cosine_or_dot(u: torch.Tensor, v: torch.Tensor, normalize: bool) -> torch.Tensor:
    dot = sum(u[d] * v[d] for d in range(u.shape[0]))
    if not normalize:
        return dot
    nu = torch.sqrt(sum(u[d] * u[d] for d in range(u.shape[0])))
    nv = torch.sqrt(sum(v[d] * v[d] for d in range(v.shape[0])))
    return dot / (nu * nv)


def _logsumexp(values: list[torch.Tensor]) -> torch.Tensor:
    top = max(float(v.detach()) for v in values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def naive_info_nce(query, keys, positive_idx, temperature, normalize=True):
    """Per-row -log( exp(s_ip / t) / sum_j exp(s_ij / t) ) as a list of 0-d tensors."""
    rows = []
    for i in range(query.shape[0]):
        s = [_cosine_or_dot(query[i], keys[j], normalize) / temperature for j in range(keys.shape[0])]
        rows.append(_logsumexp(s) - s[int(positive_idx[i])])
    return torch.stack(rows)


def naive_nt_xent(z1, z2, temperature, normalize=True):
    """SimCLR eq. (1) for all 2B views: z = [z1; z2], partner of k is k +- B, self excluded."""
    z = torch.cat([z1, z2])
    n, b = z.shape[0], z1.shape[0]
    rows = []
    for k in range(n):
        partner = k + b if k < b else k - b
        s = {j: _cosine_or_dot(z[k], z[j], normalize) / temperature for j in range(n) if j != k}
        rows.append(_logsumexp(list(s.values())) - s[partner])
    return torch.stack(rows)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------- InfoNCE exact


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_matches_naive_loss_and_grads(normalize, reduction):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([3, 0, 6, 3, 1])
    t = 0.3

    ours = info_nce(q, k, pos, t, normalize=normalize, reduction=reduction)
    ref_rows = naive_info_nce(q, k, pos, t, normalize)
    ref = {"mean": ref_rows.mean(), "sum": ref_rows.sum(), "none": ref_rows}[reduction]
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)

    # A non-trivial upstream gradient also checks the per-row ("none") backward.
    w = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    for a, b in zip(_grads((ours * w).sum(), (q, k)), _grads((ref * w).sum(), (q, k))):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_info_nce_tensor_temperature_gets_its_gradient():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64)
    k = torch.randn(6, 3, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 5, 2, 2])
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    (ours,) = _grads(info_nce(q, k, pos, t), (t,))
    (ref,) = _grads(naive_info_nce(q, k, pos, t).mean(), (t,))
    torch.testing.assert_close(ours, ref, rtol=1e-7, atol=1e-9)
    assert ours.abs() > 0


def test_info_nce_with_accuracy_returns_same_loss_and_per_row():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(6, 5, generator=g), torch.randn(9, 5, generator=g)
    pos = torch.randint(0, 9, (6,), generator=g)
    loss, acc = info_nce_with_accuracy(q, k, pos, 0.1)
    torch.testing.assert_close(loss, info_nce(q, k, pos, 0.1))
    rows, acc_rows = info_nce_with_accuracy(q, k, pos, 0.1, reduction="none")
    assert rows.shape == (6,) and acc_rows.shape == () and acc == acc_rows
    expected = (similarity_logits(q, k, 0.1).argmax(1) == pos).float().mean()
    assert acc == expected and not acc.requires_grad


# ---------------------------------------------------------------- NT-Xent exact


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nt_xent_matches_naive_loss_and_grads(normalize, reduction):
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    ours = nt_xent(z1, z2, t, normalize=normalize, reduction=reduction)
    ref_rows = naive_nt_xent(z1, z2, t, normalize)
    ref = {"mean": ref_rows.mean(), "sum": ref_rows.sum(), "none": ref_rows}[reduction]
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)

    w = torch.linspace(0.5, 2.0, ref.numel(), dtype=torch.float64).reshape(ref.shape)
    for a, b in zip(_grads((ours * w).sum(), (z1, z2, t)), _grads((ref * w).sum(), (z1, z2, t))):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_nt_xent_single_pair_has_only_its_positive():
    z1, z2 = torch.randn(1, 8), torch.randn(1, 8)
    loss, acc = nt_xent_with_accuracy(z1, z2, 0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and acc.item() == 1.0


# --------------------------------------------------- perfect and random predictors


def test_perfect_predictor_has_accuracy_one_and_near_zero_loss():
    m = 6
    keys = torch.eye(m, 8)  # orthonormal keys
    pos = torch.tensor([4, 0, 5, 1, 1, 3, 2])
    query = keys[pos].clone()  # each query is exactly its key
    loss, acc = info_nce_with_accuracy(query, keys, pos, temperature=0.01)
    assert acc.item() == 1.0
    assert loss.item() < 1e-30  # ~ (m - 1) * exp(-100)

    z = torch.eye(5, 8)
    loss, acc = nt_xent_with_accuracy(z, z.clone(), temperature=0.01)
    assert acc.item() == 1.0 and loss.item() < 1e-30


def test_random_predictor_is_at_chance():
    g = torch.Generator().manual_seed(4)
    m = 10
    q, k = torch.randn(4000, 32, generator=g), torch.randn(m, 32, generator=g)
    pos = torch.randint(0, m, (4000,), generator=g)
    loss, acc = info_nce_with_accuracy(q, k, pos, temperature=1.0)
    assert abs(acc.item() - 1 / m) < 0.025  # binomial std ~0.005
    assert abs(loss.item() - math.log(m)) < 0.05  # cosines of random 32-d vectors are ~0

    b = 1000
    z1, z2 = torch.randn(b, 32, generator=g), torch.randn(b, 32, generator=g)
    loss, acc = nt_xent_with_accuracy(z1, z2, temperature=1.0)
    assert acc.item() < 0.01  # chance is 1 / (2B - 1) = 0.0005
    assert abs(loss.item() - math.log(2 * b - 1)) < 0.05


# ------------------------------------------------------------------ dtype


def test_bfloat16_inputs_give_float32_loss_close_to_float64():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    ref = nt_xent(z1.double(), z2.double(), 0.1)
    out = nt_xent(z1.bfloat16(), z2.bfloat16(), 0.1)
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) < 0.05 * ref.item()


# ------------------------------------------------------------------ errors


def _q(*shape):
    return torch.randn(*shape)


@pytest.mark.parametrize(
    "args, match",
    [
        ((_q(2, 3, 4), _q(5, 4), torch.zeros(2, dtype=torch.long)), r"query must be 2-D \(N, D\)"),
        ((_q(2, 4), _q(5,), torch.zeros(2, dtype=torch.long)), r"keys must be 2-D \(M, D\)"),
        ((_q(2, 4), _q(5, 3), torch.zeros(2, dtype=torch.long)), r"query has D=4 but keys has D=3"),
        ((_q(2, 4), _q(5, 4), torch.zeros(2, 1, dtype=torch.long)), r"positive_idx must have shape \(N,\) = \(2,\)"),
        ((_q(2, 4), _q(5, 4), torch.zeros(3, dtype=torch.long)), r"positive_idx must have shape"),
        ((_q(2, 4), _q(5, 4), torch.zeros(2)), r"positive_idx must be a torch.long"),
        ((_q(2, 4), _q(5, 4), torch.tensor([0, 5])), r"positive_idx holds 5, outside the M=5 keys"),
        ((_q(2, 4), _q(5, 4), torch.tensor([-1, 0])), r"positive_idx holds -1"),
        ((_q(0, 4), _q(5, 4), torch.zeros(0, dtype=torch.long)), r"query is empty"),
    ],
    ids=["query-3d", "keys-1d", "width", "pos-2d", "pos-len", "pos-float", "pos-high", "pos-neg", "empty"],
)
def test_info_nce_bad_shapes_raise(args, match):
    with pytest.raises(ValueError, match="info_nce: " + match):
        info_nce(*args, temperature=0.1)


@pytest.mark.parametrize(
    "z1, z2, match",
    [
        (_q(4, 8), _q(5, 8), r"z1 and z2 must have the same shape \(B, D\), got \(4, 8\) and \(5, 8\)"),
        (_q(4, 8), _q(4, 6), r"z1 and z2 must have the same shape"),
        (_q(4), _q(4), r"z1 must be 2-D \(B, D\)"),
        (_q(0, 8), _q(0, 8), r"z1 is empty"),
    ],
    ids=["batch-mismatch", "width-mismatch", "1-d", "empty"],
)
def test_nt_xent_bad_shapes_raise(z1, z2, match):
    with pytest.raises(ValueError, match="nt_xent: " + match):
        nt_xent(z1, z2, 0.5)


@pytest.mark.parametrize(
    "t", [0.0, -1.0, float("nan"), float("inf"), "0.1", torch.ones(2)],
    ids=["zero", "negative", "nan", "inf", "string", "2-element-tensor"],
)
def test_bad_temperature_raises(t):
    with pytest.raises(ValueError, match="temperature"):
        info_nce(_q(2, 4), _q(3, 4), torch.zeros(2, dtype=torch.long), t)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(_q(2, 4), _q(2, 4), t)


def test_bad_reduction_raises():
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        info_nce(_q(2, 4), _q(3, 4), torch.zeros(2, dtype=torch.long), 0.1, reduction="avg")
    with pytest.raises(ValueError, match=r"NTXentLoss: reduction must be one of"):
        NTXentLoss(reduction="batchmean")


# ---------------------------------------------------- modules and temperature


def test_modules_store_only_hyper_parameters_and_call_the_functions():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    pos = torch.tensor([1, 4, 0])
    m = InfoNCELoss(temperature=0.2)
    torch.testing.assert_close(m(q, k, pos), info_nce(q, k, pos, 0.2))
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    n = NTXentLoss(temperature=0.3, reduction="none")
    torch.testing.assert_close(n(z1, z2), nt_xent(z1, z2, 0.3, reduction="none"))
    for module in (m, n):
        assert len(module.state_dict()) == 0
    assert "temperature=0.3" in repr(n)
    with pytest.raises(ValueError, match=r"InfoNCELoss: temperature must be a finite number > 0"):
        InfoNCELoss(temperature=0)


def test_learned_temperature_log_parameterised_and_clamped():
    lt = LearnedTemperature(init_temperature=0.07)
    assert lt().item() == pytest.approx(0.07)
    assert lt.logit_scale.dim() == 0
    assert lt.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert list(lt.state_dict()) == ["logit_scale"]

    # The loss gradient reaches the parameter through the temperature.
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    nt_xent(z1, z2, lt()).backward()
    assert lt.logit_scale.grad is not None and lt.logit_scale.grad.abs() > 0

    with torch.no_grad():
        lt.logit_scale.fill_(math.log(1e6))
    assert lt().item() == pytest.approx(0.01)  # CLIP: logit scale at most 100
    with torch.no_grad():
        lt.logit_scale.fill_(-5.0)
    assert lt().item() == pytest.approx(1.0)

    with pytest.raises(ValueError, match="LearnedTemperature: need 0 < min_temperature"):
        LearnedTemperature(init_temperature=0.001)


# ----------------------------------------------------- distributed no-op path


def test_gather_is_a_noop_without_a_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    assert rank_offset(3) == 0
    with pytest.raises(ValueError, match="batch dimension"):
        gather_with_grad(torch.tensor(1.0))
    # gather=True and gather=False agree on one process.
    z1, z2 = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(nt_xent(z1, z2, 0.5, gather=True), nt_xent(z1, z2, 0.5, gather=False))
