"""BYOL's normalised regression: 2 - 2 cos, scale invariance, who gets the gradient."""

from __future__ import annotations

import pytest
import torch

from lmssl.losses import byol_loss, normalized_regression


def _pair(seed: int = 0, n: int = 6, d: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, d, generator=g, dtype=torch.float64))


def test_equals_two_minus_two_cosine_and_unit_vector_distance():
    p, z = _pair()
    cos = [float(p[i] @ z[i] / (p[i].norm() * z[i].norm())) for i in range(p.shape[0])]
    want = sum(2 - 2 * c for c in cos) / len(cos)
    torch.testing.assert_close(normalized_regression(p, z), torch.tensor(want, dtype=torch.float64))
    unit = (p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)).pow(2).sum(1).mean()
    torch.testing.assert_close(normalized_regression(p, z), unit)


def test_zero_for_parallel_vectors_at_any_scale():
    p, _ = _pair(1)
    scales = torch.tensor([1e-3, 0.5, 1.0, 7.0, 1e3, 42.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(normalized_regression(p, p * scales), torch.zeros((), dtype=torch.float64),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(normalized_regression(p, -p), torch.full((), 4.0, dtype=torch.float64))


def test_gradient_reaches_p_only_when_caller_detaches_z():
    p, z = _pair(2)
    p.requires_grad_(True)
    z.requires_grad_(True)
    normalized_regression(p, z.detach()).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None
    p.grad = None
    normalized_regression(p, z).backward()  # not detached: the target is trained too
    assert p.grad is not None and z.grad is not None


def test_gradcheck():
    p, z = _pair(3)
    p.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: normalized_regression(a, z), (p,))


def test_byol_loss_is_the_sum_of_both_directions_with_targets_detached():
    p1, p2 = _pair(4)
    z1, z2 = _pair(5)
    for t in (p1, p2, z1, z2):
        t.requires_grad_(True)
    loss = byol_loss(p1, p2, z1, z2)
    want = normalized_regression(p1, z2) + normalized_regression(p2, z1)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert p1.grad is not None and p2.grad is not None
    assert z1.grad is None and z2.grad is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: normalized_regression(torch.randn(4, 3), torch.randn(4, 2)), "same shape"),
        (lambda: normalized_regression(torch.randn(4), torch.randn(4)), "must be 2-D"),
        (lambda: normalized_regression(torch.randn(0, 3), torch.randn(0, 3)), "empty"),
        (lambda: byol_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 3)),
         "p1 and z2 must have the same shape"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
