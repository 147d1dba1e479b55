"""VICReg: variance-invariance-covariance regularisation (Bardes, Ponce & LeCun, ICLR 2022).

Two views of a batch are embedded as ``z1, z2 (B, D)`` (row ``i`` of each comes from the
same sample). The loss pulls the two views together (invariance), keeps every embedding
dimension spread over the batch (variance) and decorrelates the dimensions (covariance),
so the embeddings cannot collapse to a point or to a low-dimensional subspace without
negatives or a momentum teacher::

    loss = inv_weight * invariance(z1, z2)
         + var_weight * (variance(z1) + variance(z2)) / 2
         + cov_weight * (covariance(z1) + covariance(z2))

The math lives in the pure functions :func:`invariance_loss`, :func:`variance_loss` and
:func:`covariance_loss`; :func:`vicreg_loss` combines them and :class:`VICRegLoss` only
stores the hyper-parameters. Shape letters: ``B`` pairs on this process, ``W`` processes,
``N = W * B`` pairs in the global batch, ``D`` embedding width.

Matching the paper
------------------
The defaults (25, 25, 1, ``gamma = 1``, ``eps = 1e-4``) are the paper's. Eq. (6) of the
paper writes ``mu * [v(Z) + v(Z')]``, but the authors' released training code, with
which those coefficients were tuned, averages the two variance terms (divides their sum
by 2) while summing the two covariance terms; this module follows the code. Under the
equation's convention the same loss has ``var_weight = 50``. The variance uses the
unbiased estimator (divides by ``N - 1``) and the covariance matrix is centred and
divided by ``N - 1``, as in the code.

Statistics over the global batch, and the gradient convention
-------------------------------------------------------------
Variance and covariance are batch statistics: on ``W`` processes with ``B`` rows each
they must be taken over all ``N = W * B`` rows, or the loss (and what it optimises)
changes with the number of processes. With ``gather=True`` and a process group of more
than one member, :func:`vicreg_loss` gathers the embeddings with
:func:`~lmssl.losses.distributed.gather_with_grad` and computes the variance and
covariance terms on the gathered ``(N, D)`` batch; every rank computes the *same* values.
The invariance term stays a mean over this rank's own ``B`` pairs: it needs no other
rank's rows.

Write ``L = l*S + V`` for the single-process loss on the global batch (``S`` the
invariance, a mean over ``N * D`` entries; ``V`` the weighted variance and covariance
terms), and ``L_s = l*S_s + V(G)`` for what rank ``s`` computes (``S_s`` the mean over
its own ``B * D`` entries, ``G`` the gathered batch, so ``V(G) = V``). Let ``z_r`` be the
rows rank ``r`` holds.

* Loss value: with equal local batch sizes ``S = (1/W) sum_s S_s``, so
  ``(1/W) sum_s L_s = L``. A single rank's loss differs from ``L`` only by its local
  invariance; average over ranks before logging.
* Gradient of the gathered terms: rank ``r`` backpropagates only ``L_r``, but the
  gather's backward sums over ranks the gradient that flows into ``G``, so rank ``r``
  receives ``sum_s dV(G)/dz_r = W * dV/dz_r``: every rank differentiated the same ``V``.
* Gradient of the invariance: only ``S_r`` contains ``z_r``, and
  ``dS/dz_r = (1/W) dS_r/dz_r`` (a ``1/(N*D)`` weight per entry against ``1/(B*D)``),
  so ``l * dS_r/dz_r = W * l * dS/dz_r``: also ``W`` times the single-process
  gradient, with no collective involved.
* So rank ``r``'s embedding gradient is ``W * dL/dz_r`` for both parts (it is the
  gradient of ``sum_s L_s``), its parameter gradient is ``W`` times the contribution of
  its rows to ``dL/dtheta``, and DDP's average over ranks (a division by ``W``) leaves
  ``dL/dtheta`` exactly: the parameter gradients of one process on the whole batch.
  Nothing is rescaled. ``tests/losses/test_vicreg_distributed.py`` checks the loss, the
  ``W``-times embedding gradients and the DDP parameter gradients against one process.

What would break it: a gather whose backward keeps only the local loss's gradient
(the variance and covariance gradients would come out ``W`` times too small against
the invariance's), dividing the gathered terms by ``W`` (same effect), or unequal local
batch sizes (``S`` is then no longer the mean of the ``S_s``). Computing the invariance on
the gathered batch as well would also be correct (its gradient is then ``W`` times by the
same argument as ``V``'s), only wasteful.

Half-precision inputs are upcast to float32: squared covariances overflow float16.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmssl.losses.distributed import gather_with_grad

__all__ = ["invariance_loss", "variance_loss", "covariance_loss", "vicreg_loss", "VICRegLoss"]


# --------------------------------------------------------------------------- checks


def _check_embeddings(name: str, arg: str, z: Tensor, min_rows: int = 1) -> None:
    if z.dim() != 2:
        raise ValueError(
            f"{name}: {arg} must be 2-D (N, D) embeddings, got shape {tuple(z.shape)}; "
            "flatten the leading dimensions first"
        )
    if z.shape[0] < min_rows or z.shape[1] == 0:
        need = f"at least {min_rows} rows" if min_rows > 1 else "at least one row"
        raise ValueError(
            f"{name}: {arg} has shape {tuple(z.shape)}; it needs {need} and at least one dimension"
            + (" (a batch statistic is undefined for fewer)" if min_rows > 1 else "")
        )


def _check_pair(name: str, z1: Tensor, z2: Tensor) -> None:
    _check_embeddings(name, "z1", z1)
    _check_embeddings(name, "z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(
            f"{name}: z1 and z2 must have the same shape (N, D), got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}; row i of z1 and row i of z2 are two views of one sample"
        )


def _check_positive(name: str, arg: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: {arg} must be a finite number > 0, got {value!r}")


def _check_weight(name: str, arg: str, value: float) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: {arg} must be a finite number >= 0, got {value!r}")


def _upcast(z: Tensor) -> Tensor:
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


# ----------------------------------------------------------------------- the terms


def invariance_loss(z1: Tensor, z2: Tensor) -> Tensor:
    """Mean squared error between the two views, averaged over rows and dimensions.

    Args:
        z1: ``(N, D)`` embeddings of the first view.
        z2: ``(N, D)``; row ``i`` pairs with ``z1[i]``.

    Returns:
        ``()`` ``mean_{i,d} (z1[i, d] - z2[i, d])**2``.
    """
    _check_pair("invariance_loss", z1, z2)
    return F.mse_loss(_upcast(z1), _upcast(z2))


def variance_loss(z: Tensor, gamma: float = 1.0, eps: float = 1e-4) -> Tensor:
    """Hinge on the per-dimension standard deviation over the batch.

    ``mean_d relu(gamma - sqrt(var_d + eps))`` with ``var_d`` the unbiased variance of
    column ``d`` (divides by ``N - 1``). Zero once every dimension has a std of at least
    ``gamma``; ``eps`` keeps the gradient of the square root finite at zero variance.

    Args:
        z: ``(N, D)`` embeddings, ``N >= 2``.
        gamma: target standard deviation (paper: 1).
        eps: added to the variance before the square root (paper: 1e-4).

    Returns:
        ``()`` the loss.
    """
    _check_positive("variance_loss", "gamma", gamma)
    _check_positive("variance_loss", "eps", eps)
    _check_embeddings("variance_loss", "z", z, min_rows=2)
    std = torch.sqrt(_upcast(z).var(dim=0) + eps)  # (D,)
    return F.relu(gamma - std).mean()


def covariance_loss(z: Tensor) -> Tensor:
    """Sum of the squared off-diagonal entries of the covariance matrix, divided by ``D``.

    The covariance is ``zc.T @ zc / (N - 1)`` with ``zc`` the column-centred ``z``.
    Zero when the dimensions are uncorrelated over the batch. Dividing by ``D`` (not by
    the ``D * (D - 1)`` off-diagonal entries) is the paper's scaling.

    Args:
        z: ``(N, D)`` embeddings, ``N >= 2``.

    Returns:
        ``()`` the loss.
    """
    _check_embeddings("covariance_loss", "z", z, min_rows=2)
    z = _upcast(z)
    n, d = z.shape
    zc = z - z.mean(dim=0, keepdim=True)  # (N, D)
    cov = zc.T @ zc / (n - 1)  # (D, D)
    off_diagonal = cov - torch.diag(torch.diagonal(cov))  # (D, D), zero diagonal
    return off_diagonal.pow(2).sum() / d


# ------------------------------------------------------------------------ the loss


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    inv_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    gather: bool = True,
    gamma: float = 1.0,
    eps: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """VICReg loss of two views, with variance and covariance over the global batch.

    ``inv_weight * invariance + var_weight * (var(z1) + var(z2)) / 2
    + cov_weight * (cov(z1) + cov(z2))`` (see the module docstring for why the variance
    is averaged over the two views and the covariance summed).

    With ``gather=True`` and a process group of more than one member initialised, the
    variance and covariance terms are computed on the embeddings gathered from every
    process (:func:`~lmssl.losses.distributed.gather_with_grad`) and the invariance on
    this process's pairs; under DDP this gives the parameter gradients of one process on
    the whole batch (derivation in the module docstring). Every process must call it with
    the same ``B``. Not distributed: ``gather`` is a no-op.

    Args:
        z1: ``(B, D)`` embeddings of the first view.
        z2: ``(B, D)`` embeddings of the second view; row ``i`` pairs with ``z1[i]``.
        inv_weight: weight of the invariance term (paper: 25).
        var_weight: weight of the variance term (paper: 25).
        cov_weight: weight of the covariance term (paper: 1).
        gather: take the variance and covariance over every process's rows.
        gamma: target standard deviation of :func:`variance_loss`.
        eps: variance stabiliser of :func:`variance_loss`.

    Returns:
        ``(loss, terms)``: ``loss`` a ``()`` tensor; ``terms`` the unweighted, detached
        ``()`` tensors ``invariance`` (this process's pairs), ``variance`` (mean over the
        two views) and ``covariance`` (sum over the two views), so that
        ``loss == inv_weight * invariance + var_weight * variance + cov_weight * covariance``.
    """
    name = "vicreg_loss"
    for arg, value in (("inv_weight", inv_weight), ("var_weight", var_weight), ("cov_weight", cov_weight)):
        _check_weight(name, arg, value)
    _check_positive(name, "gamma", gamma)
    _check_positive(name, "eps", eps)
    _check_pair(name, z1, z2)  # every check before the collective
    b, d = z1.shape

    invariance = invariance_loss(z1, z2)  # local pairs
    if gather:
        both = gather_with_grad(torch.cat([z1, z2], dim=1))  # (N, 2D): one collective for both views
        g1, g2 = both[:, :d], both[:, d:]  # (N, D) each
    else:
        g1, g2 = z1, z2
    if g1.shape[0] < 2:
        raise ValueError(
            f"{name}: the variance and covariance need at least 2 rows in the batch, got {g1.shape[0]}; "
            "use a larger batch"
        )
    variance = (variance_loss(g1, gamma, eps) + variance_loss(g2, gamma, eps)) / 2
    covariance = covariance_loss(g1) + covariance_loss(g2)
    loss = inv_weight * invariance + var_weight * variance + cov_weight * covariance
    terms = {
        "invariance": invariance.detach(),
        "variance": variance.detach(),
        "covariance": covariance.detach(),
    }
    return loss, terms


class VICRegLoss(nn.Module):
    """Module form of :func:`vicreg_loss`; holds hyper-parameters only.

    ``forward(z1 (B, D), z2 (B, D)) -> (loss, terms)`` exactly as :func:`vicreg_loss`.
    """

    def __init__(
        self,
        inv_weight: float = 25.0,
        var_weight: float = 25.0,
        cov_weight: float = 1.0,
        gather: bool = True,
        gamma: float = 1.0,
        eps: float = 1e-4,
    ) -> None:
        super().__init__()
        for arg, value in (("inv_weight", inv_weight), ("var_weight", var_weight), ("cov_weight", cov_weight)):
            _check_weight("VICRegLoss", arg, value)
        _check_positive("VICRegLoss", "gamma", gamma)
        _check_positive("VICRegLoss", "eps", eps)
        self.inv_weight = float(inv_weight)
        self.var_weight = float(var_weight)
        self.cov_weight = float(cov_weight)
        self.gather = gather
        self.gamma = float(gamma)
        self.eps = float(eps)

    def forward(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return vicreg_loss(
            z1, z2, self.inv_weight, self.var_weight, self.cov_weight, self.gather, self.gamma, self.eps
        )

    def extra_repr(self) -> str:
        return (
            f"inv_weight={self.inv_weight}, var_weight={self.var_weight}, cov_weight={self.cov_weight}, "
            f"gather={self.gather}, gamma={self.gamma}, eps={self.eps}"
        )
