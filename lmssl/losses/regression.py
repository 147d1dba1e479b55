"""BYOL's normalised regression (Grill et al., NeurIPS 2020).

The online network's prediction ``p`` regresses the target network's projection ``z`` of
the other view, both L2-normalised: ``||p/|p| - z/|z| ||**2 = 2 - 2 cos(p, z)`` (Eq. 2
of the paper). The target is not trained by this loss: its weights follow the online
network by an exponential moving average, so no gradient may reach it.

Who detaches the target: :func:`normalized_regression` is a plain function of both
arguments and differentiates both (it is also the right building block for methods
that do want a gradient through the target, e.g. SimSiam-style ablations), so a caller
that uses it directly must pass ``z.detach()`` (or compute ``z`` under
``torch.no_grad()``). :func:`byol_loss` is the BYOL objective and detaches its targets
itself.

Symmetrised as in the paper: ``L_BYOL = L(p1, z2) + L~(p2, z1)``, the *sum* of the two
directions (the paper's Section 3.1, and its released code), each a mean over the batch,
so the loss lies in ``[0, 8]``. No process needs another's rows: under DDP each process
returns the mean over its own rows and DDP's gradient average gives the parameter
gradients of one process on the whole batch (equal local batch sizes), which
``tests/losses/test_vicreg_distributed.py`` checks with two processes.

Shape letters: ``N`` rows (pairs), ``D`` embedding width. Half-precision inputs are
upcast to float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["normalized_regression", "byol_loss"]


def _check_pair(name: str, a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    for arg, x in ((a_name, a), (b_name, b)):
        if x.dim() != 2:
            raise ValueError(
                f"{name}: {arg} must be 2-D (N, D), got shape {tuple(x.shape)}; flatten the leading dimensions first"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name}: {arg} is empty (shape {tuple(x.shape)}); it needs at least one row")
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: {a_name} and {b_name} must have the same shape (N, D), got {tuple(a.shape)} and "
            f"{tuple(b.shape)}; row i of the prediction regresses row i of the target"
        )


def _upcast(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalized_regression(p: Tensor, z: Tensor) -> Tensor:
    """Mean over rows of ``2 - 2 cos(p[i], z[i])``: squared distance of the unit vectors.

    Differentiates both arguments: pass ``z.detach()`` when ``z`` is a target that must
    not be trained (see the module docstring). A zero row has cosine 0 with anything.

    Args:
        p: ``(N, D)`` predictions.
        z: ``(N, D)`` targets; row ``i`` is regressed by ``p[i]``.

    Returns:
        ``()`` the loss, in ``[0, 4]``; invariant to the scale of every row.
    """
    _check_pair("normalized_regression", "p", p, "z", z)
    cos = F.cosine_similarity(_upcast(p), _upcast(z), dim=1)  # (N,)
    return (2 - 2 * cos).mean()


def byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """BYOL's symmetrised loss ``reg(p1, z2) + reg(p2, z1)``, targets detached.

    Args:
        p1: ``(N, D)`` online predictions of view 1.
        p2: ``(N, D)`` online predictions of view 2.
        z1: ``(N, D)`` target projections of view 1 (detached here).
        z2: ``(N, D)`` target projections of view 2 (detached here).

    Returns:
        ``()`` the sum of the two :func:`normalized_regression` means, as in the paper; in ``[0, 8]``.
    """
    _check_pair("byol_loss", "p1", p1, "z2", z2)
    _check_pair("byol_loss", "p2", p2, "z1", z1)
    return normalized_regression(p1, z2.detach()) + normalized_regression(p2, z1.detach())
