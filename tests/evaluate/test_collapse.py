"""Collapse monitors on embeddings whose health is known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from lmssl.evaluate import collapse_metrics, collapse_warning, effective_rank, normalized_std

N, D = 4096, 64


def _gaussian(n: int = N, d: int = D, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_gaussian_embeddings_are_healthy():
    z = _gaussian()
    m = collapse_metrics(z)
    torch.testing.assert_close(m["healthy_std"], torch.tensor(1 / math.sqrt(D)))
    assert abs(float(m["std_ratio"]) - 1) < 0.1
    assert float(m["effective_rank"]) > 0.95 * D
    assert float(m["max_rank"]) == D
    assert collapse_warning(m, D) is None
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())


def test_healthy_batch_smaller_than_dim_is_not_flagged():
    z = _gaussian(n=32, d=2048, seed=1)  # rank at most 31: judged against 31, not against D
    m = collapse_metrics(z)
    assert float(m["max_rank"]) == 31
    assert float(m["effective_rank"]) > 25
    assert collapse_warning(m, 2048) is None


def test_rank_one_embeddings_trip_the_warning():
    g = torch.Generator().manual_seed(2)
    d = 256
    z = torch.randn(512, 1, generator=g) * torch.randn(1, d, generator=g)  # every row on one line
    m = collapse_metrics(z)
    assert abs(float(m["effective_rank"]) - 1) < 1e-3
    assert float(m["std_ratio"]) > 0.2  # +-v: the std alone would not notice
    msg = collapse_warning(m, d)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("embeddings are collapsing: normalised std")
    assert "(1/sqrt(256))" in msg and "effective rank 1 of at most 256" in msg


def test_constant_embeddings_have_zero_std_and_rank_and_trip_the_warning():
    z = torch.randn(1, D).expand(300, D).contiguous() * 3.7
    m = collapse_metrics(z)
    assert float(m["normalized_std"]) < 1e-6
    assert float(m["effective_rank"]) == 0
    msg = collapse_warning(m, D)
    assert msg is not None and "normalised std 0 against a healthy 0.125 (1/sqrt(64))" in msg


def test_shrinking_spread_trips_the_std_threshold_alone():
    z = torch.ones(N, D) + 0.02 * _gaussian(seed=3)  # full rank, but every direction almost the same
    m = collapse_metrics(z)
    assert float(m["effective_rank"]) > 0.9 * D
    assert float(m["std_ratio"]) < 0.2
    assert collapse_warning(m, D) is not None


def test_non_finite_embeddings_are_reported():
    z = _gaussian(n=16, d=8)
    z[3, 2] = float("nan")
    msg = collapse_warning(collapse_metrics(z), 8)
    assert msg is not None and "not finite" in msg


def test_effective_rank_of_known_spectra():
    # Orthogonal columns with singular values (3, 1): p = (3/4, 1/4) -> exp(H).
    u, _ = torch.linalg.qr(torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    u = u - u.mean(0)  # centred but no longer exactly orthonormal: re-orthonormalise in the centred space
    u, _ = torch.linalg.qr(u)
    z = u * torch.tensor([3.0, 1.0], dtype=torch.float64)
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    torch.testing.assert_close(effective_rank(z), torch.exp(-(p * p.log()).sum()))
    assert effective_rank(z).dtype == torch.float64


def test_normalized_std_ignores_row_scale_and_makes_no_graph():
    z = _gaussian(n=64, d=16, seed=5).requires_grad_(True)
    scaled = z * torch.rand(64, 1, generator=torch.Generator().manual_seed(6)).add(0.1)
    torch.testing.assert_close(normalized_std(scaled), normalized_std(z))
    assert not normalized_std(z).requires_grad and not effective_rank(z).requires_grad


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: collapse_metrics(torch.randn(1, 8)), "at least 2 rows"),
        (lambda: normalized_std(torch.randn(8)), "must be 2-D"),
        (lambda: effective_rank(torch.randn(2, 3, 4)), "flatten the leading dimensions"),
        (lambda: collapse_warning(collapse_metrics(torch.randn(4, 3)), 0), "dim must be >= 1"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
