"""Collapse monitors for joint-embedding methods (SimCLR, BYOL, VICReg, DINO).

Without negatives, a method can reach a trivial optimum: every input mapped to the same
embedding (complete collapse) or to a few directions (dimensional collapse). The loss
alone often does not show it (BYOL's regression loss *falls* as it collapses), so two
cheap statistics of a batch of embeddings ``z (N, D)`` are watched instead:

- :func:`normalized_std`: the mean over dimensions of the per-dimension std (over the
  batch) of the L2-normalised embeddings. Unit vectors spread evenly over the sphere
  have a variance of ``1/D`` per coordinate, so a healthy value is about
  ``1/sqrt(D)``; embeddings that all coincide give 0.
- :func:`effective_rank`: ``exp`` of the Shannon entropy of the singular values of the
  centred embedding matrix, normalised to sum to one (Roy & Vetterli 2007; RankMe,
  Garrido et al. 2023, uses it to judge SSL embeddings without labels). Between 1 and
  ``min(N - 1, D)``: about ``D`` for isotropic embeddings with ``N >> D``, 1 for
  embeddings on a line, 0 here for embeddings that are all equal.

They catch different failures: embeddings on a line through the origin, with both
signs, still have a healthy-looking normalised std (the unit vectors are ``+-v``) but
an effective rank of 1. :func:`collapse_metrics` computes both, and
:func:`collapse_warning` turns them into one line for the console when either is out of
range. All functions work on a detached copy and never build a graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "normalized_std",
    "effective_rank",
    "collapse_metrics",
    "collapse_warning",
    "STD_RATIO_THRESHOLD",
    "RANK_FRACTION_THRESHOLD",
    "RANK_FLOOR",
]

#: :func:`collapse_warning` fires when ``normalized_std * sqrt(D)`` falls below this.
STD_RATIO_THRESHOLD = 0.2
#: ... or when the effective rank falls below ``max(RANK_FLOOR, RANK_FRACTION_THRESHOLD * max_rank)``.
RANK_FRACTION_THRESHOLD = 0.01
RANK_FLOOR = 2.0


def _check_embeddings(name: str, z: Tensor) -> None:
    if z.dim() != 2:
        raise ValueError(
            f"{name}: z must be 2-D (N, D) embeddings, got shape {tuple(z.shape)}; flatten the leading dimensions first"
        )
    if z.shape[0] < 2 or z.shape[1] == 0:
        raise ValueError(
            f"{name}: z has shape {tuple(z.shape)}; a batch statistic needs at least 2 rows and 1 dimension"
        )


def _working_copy(z: Tensor) -> Tensor:
    """Detached, in float32 (float64 kept)."""
    z = z.detach()
    return z if z.dtype == torch.float64 else z.float()


def normalized_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the std over rows of the L2-normalised rows of ``z``.

    Args:
        z: ``(N, D)`` embeddings, ``N >= 2``.

    Returns:
        ``()`` float tensor (float64 for float64 input, else float32), about
        ``1/sqrt(D)`` when healthy and 0 when collapsed. The std is the unbiased one.
    """
    _check_embeddings("normalized_std", z)
    zn = F.normalize(_working_copy(z), dim=1)  # (N, D) unit rows
    return zn.std(dim=0).mean()


def effective_rank(z: Tensor) -> Tensor:
    """Effective rank of the centred embedding matrix (Roy & Vetterli 2007).

    With ``s`` the singular values of ``z - mean(z, dim=0)`` and ``p = s / sum(s)``,
    returns ``exp(-sum p log p)``. Singular values below ``max(N, D) * eps * ||z||_F``
    (the rounding noise of the centring, ``eps`` the dtype's machine epsilon) count as
    zero, so all-equal embeddings give exactly 0 rather than the rank of their noise.

    Args:
        z: ``(N, D)`` embeddings, ``N >= 2``.

    Returns:
        ``()`` float tensor in ``{0} U [1, min(N - 1, D)]``; NaN when ``z`` holds NaN or inf.
    """
    _check_embeddings("effective_rank", z)
    z = _working_copy(z)
    n, d = z.shape
    finite = torch.isfinite(z).all()  # a tensor, not a bool: no host synchronisation
    z = torch.where(finite, z, torch.zeros_like(z))  # the SVD fails on NaN/inf; the answer is NaN then
    s = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))  # (min(N, D),)
    tol = max(n, d) * torch.finfo(z.dtype).eps * torch.linalg.matrix_norm(z)
    s = torch.where(s > tol, s, torch.zeros_like(s))
    total = s.sum()
    p = s / total.clamp_min(torch.finfo(z.dtype).tiny)
    rank = torch.exp(-torch.special.xlogy(p, p).sum())
    rank = torch.where(total > 0, rank, torch.zeros_like(rank))
    return torch.where(finite, rank, torch.full_like(rank, float("nan")))


def collapse_metrics(z: Tensor) -> dict[str, Tensor]:
    """Both monitors of a batch ``z (N, D)`` and what they are measured against.

    Returns:
        Detached ``()`` float tensors on ``z``'s device (no host synchronisation):
        ``normalized_std``; ``healthy_std = 1/sqrt(D)``; ``std_ratio``, their ratio
        (about 1 when healthy, 0 when collapsed); ``effective_rank``; ``max_rank =
        min(N - 1, D)``, the largest effective rank this batch can show.
    """
    _check_embeddings("collapse_metrics", z)
    n, d = z.shape
    std = normalized_std(z)
    healthy = torch.tensor(1.0 / math.sqrt(d), dtype=std.dtype, device=std.device)
    return {
        "normalized_std": std,
        "healthy_std": healthy,
        "std_ratio": std / healthy,
        "effective_rank": effective_rank(z),
        "max_rank": torch.tensor(float(min(n - 1, d)), dtype=std.dtype, device=std.device),
    }


def collapse_warning(metrics: Mapping[str, Tensor | float], dim: int) -> str | None:
    """One console line when :func:`collapse_metrics` says the embeddings collapse, else None.

    Fires when ``std_ratio < 0.2`` or ``effective_rank < max(2, 0.01 * max_rank)``
    (``max_rank = min(N - 1, D)``, read from ``metrics``; ``dim`` when it is absent), or
    when a metric is not finite. Reads the values to the host (a synchronisation on an
    accelerator): call it when logging, not every step.

    Why these thresholds. The std ratio is about 1 for embeddings spread evenly over the
    sphere; trained embeddings are anisotropic and sit somewhat below it, and under
    collapse the ratio falls continuously towards 0. A factor of 5 below healthy is far
    outside what anisotropy alone produces but fires well before the ratio reaches 0,
    while there is still time to act. An effective rank of 1 means all embeddings lie on
    a line and 0 that they coincide; below 1% of the attainable rank almost every
    direction is unused (dimensional collapse). The floor of 2 makes the rank test
    catch the one-line case at small ``D``; the attainable rank is ``min(N - 1, D)``,
    not ``D``, so that a healthy batch smaller than ``D`` is not flagged, and the rank
    floor is capped at half of it (batches of fewer than 5 rows).

    Args:
        metrics: the output of :func:`collapse_metrics` (tensors or floats).
        dim: the embedding width ``D``.
    """
    if dim < 1:
        raise ValueError(f"collapse_warning: dim must be >= 1, got {dim}")
    std = float(metrics["normalized_std"])
    healthy = 1.0 / math.sqrt(dim)
    ratio = float(metrics.get("std_ratio", std / healthy))
    rank = float(metrics["effective_rank"])
    max_rank = float(metrics.get("max_rank", dim))
    if not all(math.isfinite(v) for v in (std, ratio, rank)):
        return (
            f"embeddings are not finite (normalised std {std:.3g}, effective rank {rank:.3g}); "
            "the model diverged: lower the learning rate or check the inputs for NaN/inf"
        )
    # capped at half the attainable rank so that a healthy batch of a few rows is not flagged
    rank_floor = min(max(RANK_FLOOR, RANK_FRACTION_THRESHOLD * max_rank), max(1.0, max_rank / 2))
    if ratio >= STD_RATIO_THRESHOLD and rank >= rank_floor:
        return None
    return (
        f"embeddings are collapsing: normalised std {std:.3g} against a healthy {healthy:.3g} "
        f"(1/sqrt({dim})); effective rank {rank:.3g} of at most {max_rank:.0f}. Check that the batch is "
        "as large as the recipe asks (BYOL/DINO collapse at small batches), lower the learning rate, "
        "or strengthen what prevents collapse (variance weight, teacher momentum, centring)"
    )
