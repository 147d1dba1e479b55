"""VICReg terms against deliberately naive float64 formulations (explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch

from lmssl.losses import VICRegLoss, covariance_loss, invariance_loss, variance_loss, vicreg_loss

N, D = 7, 5


def _views(seed: int = 0, n: int = N, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 views whose column stds sit well away from gamma = 1 (no relu kink)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.3, 0.6, 1.8, 2.5, 0.4], dtype=torch.float64)[:d]
    z1 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    z2 = z1 + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    return z1, z2


# ------------------------------------------------------------------- naive references


def naive_invariance(z1, z2):
    n, d = z1.shape
    total = 0.0
    for i in range(n):
        for k in range(d):
            total = total + (z1[i, k] - z2[i, k]) ** 2
    return total / (n * d)


def naive_variance(z, gamma=1.0, eps=1e-4):
    n, d = z.shape
    total = 0.0
    for k in range(d):
        mean = sum(z[i, k] for i in range(n)) / n
        var = sum((z[i, k] - mean) ** 2 for i in range(n)) / (n - 1)
        std = torch.sqrt(var + eps)
        total = total + torch.clamp(gamma - std, min=0.0)
    return total / d


def naive_covariance(z):
    n, d = z.shape
    means = [sum(z[i, k] for i in range(n)) / n for k in range(d)]
    total = 0.0
    for j in range(d):
        for k in range(d):
            if j == k:
                continue
            c = sum((z[i, j] - means[j]) * (z[i, k] - means[k]) for i in range(n)) / (n - 1)
            total = total + c**2
    return total / d


def naive_vicreg(z1, z2, lam=25.0, mu=25.0, nu=1.0, gamma=1.0, eps=1e-4):
    return (lam * naive_invariance(z1, z2)
            + mu * (naive_variance(z1, gamma, eps) + naive_variance(z2, gamma, eps)) / 2
            + nu * (naive_covariance(z1) + naive_covariance(z2)))


def _grads(fn, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    return torch.autograd.grad(fn(*xs), xs)


# ------------------------------------------------------------------------ the terms


def test_invariance_matches_naive_value_and_gradient():
    z1, z2 = _views()
    torch.testing.assert_close(invariance_loss(z1, z2), naive_invariance(z1, z2), rtol=1e-12, atol=0)
    for got, want in zip(_grads(invariance_loss, z1, z2), _grads(naive_invariance, z1, z2)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_variance_matches_naive_value_and_gradient(gamma):
    z, _ = _views(1)
    got = variance_loss(z, gamma=gamma, eps=1e-4)
    assert got > 0  # some columns are below gamma: the hinge is active
    torch.testing.assert_close(got, naive_variance(z, gamma, 1e-4), rtol=1e-12, atol=0)
    (g_got,) = _grads(lambda x: variance_loss(x, gamma, 1e-4), z)
    (g_want,) = _grads(lambda x: naive_variance(x, gamma, 1e-4), z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-15)


def test_covariance_matches_naive_value_and_gradient():
    z, _ = _views(2)
    torch.testing.assert_close(covariance_loss(z), naive_covariance(z), rtol=1e-12, atol=0)
    (g_got,) = _grads(covariance_loss, z)
    (g_want,) = _grads(naive_covariance, z)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-15)


def test_vicreg_loss_matches_naive_and_terms_recombine():
    z1, z2 = _views(3)
    loss, terms = vicreg_loss(z1, z2, inv_weight=3.0, var_weight=5.0, cov_weight=0.7)
    torch.testing.assert_close(loss, naive_vicreg(z1, z2, 3.0, 5.0, 0.7), rtol=1e-12, atol=0)
    assert set(terms) == {"invariance", "variance", "covariance"}
    assert all(not t.requires_grad for t in terms.values())
    torch.testing.assert_close(terms["invariance"], naive_invariance(z1, z2))
    torch.testing.assert_close(terms["variance"], (naive_variance(z1) + naive_variance(z2)) / 2)
    torch.testing.assert_close(terms["covariance"], naive_covariance(z1) + naive_covariance(z2))
    torch.testing.assert_close(loss, 3.0 * terms["invariance"] + 5.0 * terms["variance"] + 0.7 * terms["covariance"])
    for got, want in zip(_grads(lambda a, b: vicreg_loss(a, b)[0], z1, z2), _grads(naive_vicreg, z1, z2)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-14)


def test_vicreg_loss_gradcheck():
    z1, z2 = _views(4)
    z1.requires_grad_(True)
    z2.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b, gather=False)[0], (z1, z2))


def test_module_stores_only_hyper_parameters_and_matches_function():
    z1, z2 = _views(5)
    module = VICRegLoss(inv_weight=10.0, var_weight=20.0, cov_weight=2.0, gamma=1.5)
    assert list(module.parameters()) == [] and list(module.buffers()) == []
    loss, terms = module(z1, z2)
    ref, ref_terms = vicreg_loss(z1, z2, 10.0, 20.0, 2.0, gamma=1.5)
    torch.testing.assert_close(loss, ref)
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k])
    assert "var_weight=20.0" in repr(module)


# ----------------------------------------------------------------------- zero cases


def test_invariance_zero_for_identical_views():
    z, _ = _views(6)
    assert invariance_loss(z, z.clone()) == 0


def test_variance_zero_when_every_std_reaches_gamma():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(64, D, generator=g, dtype=torch.float64)
    z = (z - z.mean(0)) / z.std(0) * torch.tensor([2.0, 1.0, 3.0, 1.5, 5.0], dtype=torch.float64)
    assert (z.std(0) >= 1.0 - 1e-12).all()
    assert variance_loss(z, gamma=1.0) == 0
    assert variance_loss(z, gamma=1.2) > 0  # the one column with std exactly 1 is now below gamma


def test_covariance_and_variance_zero_for_whitened_data():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(50, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    x = x - x.mean(0)
    cov = x.T @ x / (x.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    z = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T  # covariance exactly the identity
    assert covariance_loss(x) > 1e-2  # the raw data is correlated
    assert covariance_loss(z) < 1e-18  # off-diagonal covariances at rounding level (~1e-10)
    assert variance_loss(z) == 0  # unit std: relu(1 - sqrt(1 + eps)) = 0


def test_covariance_zero_for_one_dimension():
    assert covariance_loss(torch.randn(5, 1, dtype=torch.float64)) == 0


# ---------------------------------------------------------------------- dtypes, errors


def test_half_precision_inputs_are_upcast():
    z1, z2 = _views(9)
    loss, _ = vicreg_loss(z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), vicreg_loss(z1, z2)[0].item(), rel_tol=2e-2)


def test_not_distributed_gather_is_a_no_op():
    z1, z2 = _views(10)
    torch.testing.assert_close(vicreg_loss(z1, z2, gather=True)[0], vicreg_loss(z1, z2, gather=False)[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: invariance_loss(torch.randn(4, 3), torch.randn(4, 2)), "same shape"),
        (lambda: invariance_loss(torch.randn(4), torch.randn(4)), "must be 2-D"),
        (lambda: variance_loss(torch.randn(1, 3)), "at least 2 rows"),
        (lambda: variance_loss(torch.randn(2, 3, 4)), "flatten the leading dimensions"),
        (lambda: variance_loss(torch.randn(4, 3), gamma=0.0), "gamma must be a finite number > 0"),
        (lambda: covariance_loss(torch.randn(1, 3)), "at least 2 rows"),
        (lambda: vicreg_loss(torch.randn(4, 3), torch.randn(5, 3)), "two views of one sample"),
        (lambda: vicreg_loss(torch.randn(1, 3), torch.randn(1, 3)), "at least 2 rows"),
        (lambda: vicreg_loss(torch.randn(4, 3), torch.randn(4, 3), var_weight=-1.0), "var_weight"),
        (lambda: VICRegLoss(eps=0.0), "eps must be a finite number > 0"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
