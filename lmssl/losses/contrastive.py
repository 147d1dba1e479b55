"""Contrastive losses: InfoNCE and SimCLR's NT-Xent, plus a learned temperature.

The math lives in pure functions; ``InfoNCELoss`` and ``NTXentLoss`` only store
hyper-parameters and call them. Shape letters: ``N`` queries, ``M`` keys, ``D``
embedding width, ``B`` positive pairs on this process, ``W`` processes.

Similarities are computed in the input dtype; logits in float16/bfloat16 are upcast to
float32 before the softmax so the loss keeps its precision under mixed precision.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmssl.losses.distributed import gather_with_grad, rank_offset

__all__ = [
    "similarity_logits",
    "info_nce",
    "info_nce_with_accuracy",
    "nt_xent",
    "nt_xent_with_accuracy",
    "LearnedTemperature",
    "InfoNCELoss",
    "NTXentLoss",
]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- checks


def _check_temperature(name: str, temperature: float | Tensor) -> None:
    """A Python number must be > 0; a tensor must hold one value (not read: no sync)."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"{name}: temperature tensor must hold a single value, "
                f"got shape {tuple(temperature.shape)}"
            )
        return
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise ValueError(f"{name}: temperature must be a float or a 1-element tensor, got {temperature!r}")
    if not math.isfinite(float(temperature)) or temperature <= 0:
        raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature}")


def _check_reduction(name: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_matrix(name: str, arg: str, x: Tensor, letters: str) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"{name}: {arg} must be 2-D {letters}, got shape {tuple(x.shape)}; "
            "flatten the leading dimensions first"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: {arg} is empty (shape {tuple(x.shape)}); it needs at least one row")


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses


def _accuracy(logits: Tensor, positive_idx: Tensor) -> Tensor:
    """() float32: fraction of rows whose positive has the highest logit (no grad)."""
    return (logits.detach().argmax(dim=1) == positive_idx).float().mean()


# ---------------------------------------------------------------------- InfoNCE


def _scaled_similarity(
    name: str, query: Tensor, keys: Tensor, temperature: float | Tensor, normalize: bool
) -> Tensor:
    """Checked ``query (N, D) @ keys.T (D, M) / temperature`` -> ``(N, M)``; ``name`` prefixes errors."""
    _check_temperature(name, temperature)
    _check_matrix(name, "query", query, "(N, D)")
    _check_matrix(name, "keys", keys, "(M, D)")
    if query.shape[1] != keys.shape[1]:
        raise ValueError(
            f"{name}: query has D={query.shape[1]} but keys has D={keys.shape[1]}; "
            "project both to the same width"
        )
    if normalize:
        query = F.normalize(query, dim=1)
        keys = F.normalize(keys, dim=1)
    logits = query @ keys.T  # (N, M)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if isinstance(temperature, Tensor):
        temperature = temperature.reshape(())
    return logits / temperature


def similarity_logits(
    query: Tensor, keys: Tensor, temperature: float | Tensor, normalize: bool = True
) -> Tensor:
    """Scaled similarities ``query @ keys.T / temperature``.

    Args:
        query: ``(N, D)``.
        keys: ``(M, D)``.
        temperature: float > 0, or a 1-element tensor (e.g. ``LearnedTemperature()()``).
        normalize: L2-normalise rows first, making the similarity a cosine.

    Returns:
        ``(N, M)`` logits; float16/bfloat16 inputs give float32 logits.
    """
    return _scaled_similarity("similarity_logits", query, keys, temperature, normalize)


def _info_nce_logits(
    query: Tensor, keys: Tensor, positive_idx: Tensor, temperature: float | Tensor, normalize: bool
) -> Tensor:
    _check_matrix("info_nce", "query", query, "(N, D)")
    _check_matrix("info_nce", "keys", keys, "(M, D)")
    n, m = query.shape[0], keys.shape[0]
    if positive_idx.shape != (n,):
        raise ValueError(
            f"info_nce: positive_idx must have shape (N,) = ({n},), got {tuple(positive_idx.shape)}"
        )
    if positive_idx.dtype != torch.long:
        raise ValueError(
            f"info_nce: positive_idx must be a torch.long tensor of key indices, got {positive_idx.dtype}"
        )
    # Range check only where it costs no device synchronisation.
    if positive_idx.device.type == "cpu" and ((positive_idx < 0) | (positive_idx >= m)).any():
        bad = positive_idx[(positive_idx < 0) | (positive_idx >= m)][0].item()
        raise ValueError(f"info_nce: positive_idx holds {bad}, outside the M={m} keys [0, {m - 1}]")
    return _scaled_similarity("info_nce", query, keys, temperature, normalize)


def info_nce(
    query: Tensor,
    keys: Tensor,
    positive_idx: Tensor,
    temperature: float | Tensor,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """InfoNCE: cross-entropy of ``query @ keys.T / temperature`` against the positive key.

    Row ``i`` loss: ``-s[i, p_i] + logsumexp_j s[i, j]`` with ``s`` the scaled
    similarities and ``p_i = positive_idx[i]``; every other key is a negative.

    Args:
        query: ``(N, D)``.
        keys: ``(M, D)``.
        positive_idx: ``(N,)`` long, index in ``[0, M)`` of each query's positive key.
        temperature: float > 0 or a 1-element tensor.
        normalize: L2-normalise query and keys (cosine similarity).
        reduction: ``"mean"`` (scalar), ``"sum"`` (scalar) or ``"none"`` (``(N,)``).
    """
    _check_reduction("info_nce", reduction)
    logits = _info_nce_logits(query, keys, positive_idx, temperature, normalize)  # (N, M)
    return F.cross_entropy(logits, positive_idx, reduction=reduction)


def info_nce_with_accuracy(
    query: Tensor,
    keys: Tensor,
    positive_idx: Tensor,
    temperature: float | Tensor,
    normalize: bool = True,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """:func:`info_nce` and its top-1 accuracy.

    Returns:
        ``(loss, accuracy)``: loss as in :func:`info_nce` (``(N,)`` per-row losses with
        ``reduction="none"``); accuracy a detached ``()`` float32, the fraction of
        queries whose positive key has the highest logit.
    """
    _check_reduction("info_nce", reduction)
    logits = _info_nce_logits(query, keys, positive_idx, temperature, normalize)  # (N, M)
    loss = F.cross_entropy(logits, positive_idx, reduction=reduction)
    return loss, _accuracy(logits, positive_idx)


# ---------------------------------------------------------------------- NT-Xent


def _nt_xent_logits(
    z1: Tensor, z2: Tensor, temperature: float | Tensor, gather: bool, normalize: bool
) -> tuple[Tensor, Tensor]:
    """Logits ``(2B, 2WB)`` with self-similarity at -inf, and positives ``(2B,)``."""
    _check_temperature("nt_xent", temperature)  # before any collective
    _check_matrix("nt_xent", "z1", z1, "(B, D)")
    _check_matrix("nt_xent", "z2", z2, "(B, D)")
    if z1.shape != z2.shape:
        raise ValueError(
            f"nt_xent: z1 and z2 must have the same shape (B, D), got {tuple(z1.shape)} and "
            f"{tuple(z2.shape)}; row i of z1 and row i of z2 are two views of one sample"
        )
    b = z1.shape[0]
    if normalize:  # before the gather: each rank normalises its own rows once
        z1 = F.normalize(z1, dim=1)
        z2 = F.normalize(z2, dim=1)
    local = torch.cat([z1, z2], dim=0)  # (2B, D): queries, [view 1; view 2]
    if gather:
        keys = gather_with_grad(local)  # (2WB, D): rank r's 2B rows at r * 2B
        offset = rank_offset(2 * b)
    else:
        keys, offset = local, 0
    logits = _scaled_similarity("nt_xent", local, keys, temperature, normalize=False)  # (2B, 2WB)
    rows = torch.arange(2 * b, device=logits.device)
    self_idx = rows + offset  # (2B,) where each query sits among the keys
    positive_idx = (rows + b) % (2 * b) + offset  # (2B,) the other view of the same sample
    logits = logits.scatter(1, self_idx[:, None], float("-inf"))
    return logits, positive_idx


def nt_xent(
    z1: Tensor,
    z2: Tensor,
    temperature: float | Tensor,
    gather: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """SimCLR's normalised-temperature cross-entropy over ``2B`` views.

    Each of the ``2B`` embeddings is a query whose positive is the other view of the
    same sample and whose negatives are every other embedding except itself (``2B - 2``
    of them on one process). Symmetric: both views are queries.

    With ``gather=True`` and ``torch.distributed`` initialised, the keys are gathered
    from all ``W`` processes with :func:`gather_with_grad` (``2WB - 2`` negatives), the
    queries stay local, and the loss is averaged over this process's ``2B`` rows. Under
    DDP this gives the parameter gradients of one process computing the loss on the
    global batch (see ``lmssl.losses.distributed``). Not distributed: ``gather`` is a
    no-op.

    Args:
        z1: ``(B, D)`` embeddings of the first view.
        z2: ``(B, D)`` embeddings of the second view; row ``i`` pairs with ``z1[i]``.
        temperature: float > 0 or a 1-element tensor.
        gather: take negatives from every process.
        normalize: L2-normalise embeddings (cosine similarity), as SimCLR does.
        reduction: ``"mean"``/``"sum"`` (scalar) or ``"none"`` (``(2B,)``, rows of
            ``z1`` first, then rows of ``z2``).
    """
    _check_reduction("nt_xent", reduction)
    logits, positive_idx = _nt_xent_logits(z1, z2, temperature, gather, normalize)
    return F.cross_entropy(logits, positive_idx, reduction=reduction)


def nt_xent_with_accuracy(
    z1: Tensor,
    z2: Tensor,
    temperature: float | Tensor,
    gather: bool = True,
    normalize: bool = True,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """:func:`nt_xent` and the detached ``()`` fraction of views whose partner ranks first."""
    _check_reduction("nt_xent", reduction)
    logits, positive_idx = _nt_xent_logits(z1, z2, temperature, gather, normalize)
    loss = F.cross_entropy(logits, positive_idx, reduction=reduction)
    return loss, _accuracy(logits, positive_idx)


# ------------------------------------------------------------------------ modules


class LearnedTemperature(nn.Module):
    """Learned softmax temperature, log-parameterised and clamped, as in CLIP.

    Stores ``logit_scale = log(1 / temperature)`` (CLIP's name and meaning, a 0-d
    parameter, so ``dim >= 2`` weight-decay rules skip it). ``forward()`` returns the
    ``()`` temperature to pass as ``temperature=`` to the loss functions, clamped to
    ``[min_temperature, max_temperature]``. The clamp is applied in ``forward``: while the
    parameter sits beyond a bound it gets no gradient.

    Args:
        init_temperature: starting temperature (CLIP: 0.07).
        min_temperature: lower bound (CLIP: 0.01, i.e. a logit scale of at most 100).
        max_temperature: upper bound.
    """

    def __init__(
        self, init_temperature: float = 0.07, min_temperature: float = 0.01, max_temperature: float = 1.0
    ) -> None:
        super().__init__()
        if not 0 < min_temperature <= init_temperature <= max_temperature:
            raise ValueError(
                "LearnedTemperature: need 0 < min_temperature <= init_temperature <= max_temperature, "
                f"got {min_temperature}, {init_temperature}, {max_temperature}"
            )
        self.min_temperature = float(min_temperature)
        self.max_temperature = float(max_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def forward(self) -> Tensor:
        """() the current temperature."""
        log_scale = self.logit_scale.clamp(
            math.log(1.0 / self.max_temperature), math.log(1.0 / self.min_temperature)
        )
        return torch.exp(-log_scale)

    def extra_repr(self) -> str:
        return f"min_temperature={self.min_temperature}, max_temperature={self.max_temperature}"


class InfoNCELoss(nn.Module):
    """Module form of :func:`info_nce`; holds hyper-parameters only.

    ``forward(query (N, D), keys (M, D), positive_idx (N,)) -> loss``. For a learned
    temperature call :func:`info_nce` with ``temperature=LearnedTemperature()()``.
    """

    def __init__(self, temperature: float = 0.1, normalize: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        _check_temperature("InfoNCELoss", temperature)
        _check_reduction("InfoNCELoss", reduction)
        self.temperature = float(temperature)
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, query: Tensor, keys: Tensor, positive_idx: Tensor) -> Tensor:
        return info_nce(query, keys, positive_idx, self.temperature, self.normalize, self.reduction)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, reduction={self.reduction!r}"


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`; holds hyper-parameters only.

    ``forward(z1 (B, D), z2 (B, D)) -> loss``.
    """

    def __init__(
        self, temperature: float = 0.5, gather: bool = True, normalize: bool = True, reduction: str = "mean"
    ) -> None:
        super().__init__()
        _check_temperature("NTXentLoss", temperature)
        _check_reduction("NTXentLoss", reduction)
        self.temperature = float(temperature)
        self.gather = gather
        self.normalize = normalize
        self.reduction = reduction

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent(z1, z2, self.temperature, self.gather, self.normalize, self.reduction)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, gather={self.gather}, "
            f"normalize={self.normalize}, reduction={self.reduction!r}"
        )
