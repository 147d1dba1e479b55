"""Cross-entropy over a vocabulary projection, fused and chunked: ``hidden -> loss`` without
ever holding the full ``(N, vocab)`` logits.

A language model's last step is ``logits = h @ W.T`` (``N`` rows by ``V`` vocabulary
columns) followed by a softmax cross-entropy. Done the plain way, it allocates the
``N x V`` logits, a ``N x V`` log-softmax, a ``N x V`` zero-filled gradient for the
gather and a ``N x V`` gradient of the log-softmax: four passes over the largest tensor
of the whole step (67 MB each for 2,040 rows by 8,192 tokens, 0.4 GB for GPT-2's
vocabulary at 2,048 rows), which on a CPU are first-touched page by page each step.

:func:`linear_cross_entropy` walks the rows in chunks instead. For each chunk it computes
the chunk's logits into one reused buffer, turns them into probabilities in place, reads
off the loss, then overwrites the buffer with ``d loss / d logits = softmax - one_hot``
and immediately folds it into the gradients of ``h`` (a matrix product with ``W``) and of
``W`` (accumulated over chunks). The backward pass is then only a rescaling by the
incoming gradient. The largest buffer is ``chunk x V``; the matrix products are the same
three the plain path does, in row blocks.

Numerics: logits and softmax are in float32 (under autocast the matrix products run in
the autocast dtype and the chunk is upcast before the softmax), rows are shifted by their
maximum, and the loss is the mean over rows whose target is not ``ignore_index``, as
``torch.nn.functional.cross_entropy`` computes it. Columns at or past ``vocab_size`` (the
rows of ``W`` that only pad the vocabulary up to a multiple of 64) are excluded from the
softmax and get zero gradient. ``tests/losses/test_linear_cross_entropy.py`` compares
loss and all gradients with the plain path.

When no gradient is wanted (evaluation, ``torch.no_grad``) only the loss is computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy", "default_chunk_rows"]

# Rows per chunk: enough that each chunk's matrix products run at full speed, few enough that
# the chunk's logits (rows x V float32) stay small next to the full logits. On a CPU the row
# count is what matters: measured on the project's 2-core machine (loss + gradients, per
# 1,024 rows), 256-512 rows run at 0.17-0.18 TFLOP/s for V = 8192, 32000 and 50257, while 128
# rows ran at 0.13-0.15 (V = 32000 at 131 rows: 1,122 ms against 844 at 512; GPT-2's 50257 at
# 128 rows: 1,605 ms against 1,341) and 1,024 rows no faster than 512. So a CPU chunk is 512
# rows, down to 256 for vocabularies past ~125k (a 128 MiB chunk). On a GPU larger chunks
# amortise the kernel launches: 32M logits a chunk.
_CHUNK_ELEMENTS = 32 * 1024 * 1024
_CPU_ROWS = (256, 512)


def default_chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    rows = _CHUNK_ELEMENTS // max(1, vocab)
    rows = min(_CPU_ROWS[1], max(_CPU_ROWS[0], rows)) if device.type == "cpu" else max(128, rows)
    return min(n_rows, rows) if n_rows else 1


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss in the forward pass, gradients too (when wanted); backward only rescales them.

    Each chunk's logits are held transposed, ``(V, rows)``: ``W @ x.T`` and then
    ``W.T``-free products for both gradients, which on the project's 2-core CPU measured
    up to ~10% faster than the ``(rows, V)`` layout (``x @ W.T`` reads ``W`` transposed).
    """

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, ignore_index: int,
                vocab_size: int, chunk_rows: int, want_grad: bool, compute_dtype: torch.dtype):
        n, v = h.shape[0], weight.shape[0]
        device = h.device
        valid = targets != ignore_index
        count = valid.sum()
        inv_count = 1.0 / count.clamp(min=1).to(torch.float32)
        safe_targets = torch.where(valid, targets, 0)
        w = weight.to(compute_dtype)
        x_all = h.to(compute_dtype)
        b = bias.to(torch.float32)[:, None] if bias is not None else None  # (V, 1)
        fp32 = compute_dtype == torch.float32

        needs = ctx.needs_input_grad
        grad_h = torch.empty_like(h) if want_grad and needs[0] else None
        # filled by the first chunk (zeros only when there is no chunk at all)
        grad_w = (torch.empty_like if n else torch.zeros_like)(weight, dtype=torch.float32) if (
            want_grad and needs[1]) else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=device) if (
            want_grad and bias is not None and needs[2]) else None
        any_grad = grad_h is not None or grad_w is not None or grad_b is not None
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        storage = torch.empty(v * min(chunk_rows, n), dtype=compute_dtype, device=device)  # reused by every chunk

        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            x = x_all[start:end]  # (rows, D)
            raw = torch.mm(w, x.t(), out=storage[: v * (end - start)].view(v, end - start))
            z = raw if fp32 else raw.float()  # (V, rows) float32 logits
            if b is not None:
                z.add_(b)
            if vocab_size < v:
                z[vocab_size:] = float("-inf")
            t, ok = safe_targets[start:end], valid[start:end]
            zmax = z.amax(dim=0)  # (rows,)
            target_logit = z.gather(0, t[None]).squeeze(0)
            correct += ((target_logit >= zmax) & ok).sum()
            z.sub_(zmax).exp_()
            total = z.sum(dim=0)
            loss_sum += torch.where(ok, total.log() + zmax - target_logit, 0.0).sum()
            if not any_grad:
                continue
            # d(mean loss) / d logits = (softmax - one_hot) / count, zero on ignored rows
            z.mul_(torch.where(ok, inv_count / total, 0.0))
            z.scatter_add_(0, t[None], torch.where(ok, -inv_count, 0.0)[None])
            g = z if fp32 else z.to(compute_dtype)
            if grad_h is not None:
                if grad_h.dtype == compute_dtype:
                    torch.mm(g.t(), w, out=grad_h[start:end])
                else:
                    grad_h[start:end] = torch.mm(g.t(), w)
            if grad_w is not None:  # the first chunk writes grad_w, later ones add to it
                if fp32 and start == 0:
                    torch.mm(g, x, out=grad_w)
                elif fp32:
                    grad_w.addmm_(g, x)
                elif start == 0:
                    grad_w.copy_(torch.mm(g, x))
                else:
                    grad_w += torch.mm(g, x).float()
            if grad_b is not None:
                grad_b += z.sum(dim=1)

        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(correct, count)
        return loss_sum * inv_count, correct, count

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct, _grad_count):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        # Scaled in place: the buffers are this node's own, and a fresh (V, D) product cost
        # 131 ms a step on llama_small's 32000 x 768 head on a CPU, mostly page faults
        # (a second backward through the node is refused by autograd's saved-tensor version check).
        out_h = grad_h.mul_(grad_loss.to(grad_h.dtype)) if grad_h is not None else None
        out_w = grad_w.mul_(grad_loss).to(w_dtype) if grad_w is not None else None
        out_b = grad_b.mul_(grad_loss).to(b_dtype) if grad_b is not None else None
        return out_h, out_w, out_b, None, None, None, None, None, None


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, vocab_size: int | None = None,
                         chunk_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of ``h @ weight.T (+ bias)`` against ``targets``, in row chunks.

    ``h (N, D)``, ``weight (V, D)``, ``targets (N,)`` with ``ignore_index`` for rows not
    scored. ``vocab_size`` (default ``V``): only the first ``vocab_size`` columns take part
    in the softmax. Returns ``(loss, correct, count)``: the mean loss over scored rows (a
    0-dim float32 tensor, differentiable w.r.t. ``h``, ``weight`` and ``bias``), how many
    scored rows have their target as the arg-max (no gradient), and how many rows were
    scored. With no scored row the loss is 0 and every gradient is zero. The gradients are
    computed in the forward pass and scaled in place by the backward pass, so a graph
    through this loss can be backpropagated once (a second ``backward`` raises).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h must be (N, D) and weight (V, D), got {tuple(h.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets must be ({h.shape[0]},), got {tuple(targets.shape)}")
    v = weight.shape[0]
    vocab_size = v if vocab_size is None else vocab_size
    if not 0 < vocab_size <= v:
        raise ValueError(f"linear_cross_entropy: vocab_size must be in [1, {v}], got {vocab_size}")
    rows = chunk_rows or default_chunk_rows(h.shape[0], v, h.device)
    if torch.is_autocast_enabled(h.device.type):
        compute_dtype = torch.get_autocast_dtype(h.device.type)
    else:
        compute_dtype = h.dtype
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or
                                             (bias is not None and bias.requires_grad))
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, bias, targets, ignore_index, vocab_size, rows, want_grad,
                                         compute_dtype)
