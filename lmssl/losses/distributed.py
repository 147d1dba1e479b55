"""All-gather with gradient, for losses whose negatives come from every process.

A contrastive loss wants the embeddings of the whole global batch as negatives, but
each process only holds its own shard. ``torch.distributed.all_gather`` copies the
shards across processes without any autograd history, so the gradient that a rank's
loss sends to *other* ranks' embeddings would be lost. ``gather_with_grad`` keeps it.

Why the backward is ``all_reduce(sum)`` followed by taking this rank's slice
----------------------------------------------------------------------------
Call the loss computed on rank ``s`` ``L_s``; every ``L_s`` reads the gathered tensor
``G = cat(x_0, ..., x_{W-1})``, so it depends on every shard ``x_r``. The gradient that
matters for shard ``x_r`` is the one of the summed loss::

    d(sum_s L_s) / d x_r  =  sum_s  (d L_s / d G)[rows of rank r]

Rank ``s`` only knows ``d L_s / d G``. Summing these tensors over ranks (``all_reduce``
with ``SUM``) and keeping rows ``[r * b, (r + 1) * b)`` gives exactly the right-hand
side on rank ``r`` (``reduce_scatter`` would be the same thing with less traffic; the
all-reduce form is used because every backend, gloo included, implements it).

Gradient convention under DDP
-----------------------------
With this backward, the gradient a rank sees for its local shard is the gradient of
``sum_s L_s``, i.e. ``W`` times the gradient of the mean ``(1/W) sum_s L_s``. DDP then
averages parameter gradients over ranks (divides by ``W``), so when every rank returns
the mean of its own rows (equal local batch sizes) the parameter gradients equal those
of one process computing the loss, averaged over the whole global batch. Nothing needs
rescaling. ``tests/losses/test_losses_distributed.py`` checks both statements.

Requirements: every rank passes a tensor of the same shape (``all_gather`` needs it;
use ``drop_last``/Accelerate's ``even_batches``), and every rank backpropagates through
the gathered tensor, because the backward is itself a collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_with_grad", "rank_offset"]


def _is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and has more than one member."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: all-reduce(sum), keep own rows."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        # x: (b, ...) -> (W * b, ...), rank r's rows at [r * b, (r + 1) * b)
        x = x.contiguous()
        shards = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, x, group=group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.local_batch = x.shape[0]
        return torch.cat(shards, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # grad: (W * b, ...). Clone: all_reduce works in place on autograd's buffer.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.local_batch
        return grad[start : start + ctx.local_batch], None


def gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, differentiably.

    Args:
        x: ``(b, ...)`` local shard; the same shape on every rank.
        group: process group, default the world.

    Returns:
        ``(W * b, ...)`` with rank ``r``'s rows at ``[r * b, (r + 1) * b)``
        (see :func:`rank_offset`). Returns ``x`` itself when ``torch.distributed`` is
        not initialised or the world size is 1.
    """
    if x.dim() == 0:
        raise ValueError("gather_with_grad: x must have a batch dimension (b, ...), got a 0-d tensor")
    if not _is_distributed(group):
        return x
    return _GatherWithGrad.apply(x, group)


def rank_offset(local_batch: int, group: dist.ProcessGroup | None = None) -> int:
    """Index of this rank's first row in the output of :func:`gather_with_grad`.

    ``rank * local_batch`` (every rank has the same ``local_batch``); 0 when not
    distributed.
    """
    if local_batch < 0:
        raise ValueError(f"rank_offset: local_batch must be >= 0, got {local_batch}")
    if not _is_distributed(group):
        return 0
    return dist.get_rank(group) * local_batch
