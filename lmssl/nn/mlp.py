"""Feed-forward block: plain (GPT-2, BERT) or gated (SwiGLU, Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class _SwiGLUIn(torch.autograd.Function):
    """``silu(x @ Wg.T + bg) * (x @ Wu.T + bu)`` for ``W = [Wg; Wu]`` (``fc1``'s weight, gate
    rows first), with the gate and up projections as two matrix products into contiguous
    tensors, and their gradients written straight into the two halves of ``W``'s gradient.

    Done the plain way (``fc1(x).chunk(2, -1)``) the gate and up halves are strided views of
    one tensor: element-wise kernels on them ran several times slower on a CPU (in a profiled
    llama_small step, 1 x 1024 tokens: silu 78 ms against 9 for contiguous input), and
    ``chunk``'s backward concatenates the two halves' gradients into a fresh tensor (the
    step's concatenations, mostly these, took 126 ms).
    Same arithmetic, no strided halves, no concatenation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        H = weight.shape[0] // 2
        w = weight.to(dtype)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, D)
        if bias is None:
            gate, up = torch.mm(x2, w[:H].t()), torch.mm(x2, w[H:].t())  # (N, H) each
        else:
            b = bias.to(dtype)
            gate, up = torch.addmm(b[:H], x2, w[:H].t()), torch.addmm(b[H:], x2, w[H:].t())
        s = F.silu(gate)
        ctx.save_for_backward(x2, w, gate, up, s)
        ctx.has_bias, ctx.x_shape, ctx.in_dtype, ctx.w_dtype = bias is not None, x.shape, x.dtype, weight.dtype
        return (s * up).view(*x.shape[:-1], H)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, w, gate, up, s = ctx.saved_tensors
        H = w.shape[0] // 2
        dy = dy.reshape(-1, H).to(w.dtype)
        d_up = dy * s
        d_gate = torch.ops.aten.silu_backward(dy * up, gate)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = torch.mm(d_gate, w[:H]).addmm_(d_up, w[H:]).view(ctx.x_shape).to(ctx.in_dtype)
        if need_w:
            dw = torch.empty(w.shape, dtype=w.dtype, device=w.device)
            torch.mm(d_gate.t(), x2, out=dw[:H])  # rows of a contiguous tensor: contiguous
            torch.mm(d_up.t(), x2, out=dw[H:])
            dw = dw.to(ctx.w_dtype)
        if need_b and ctx.has_bias:
            db = torch.cat([d_gate.sum(0), d_up.sum(0)]).to(ctx.w_dtype)
        return dx, dw, db, None


def swiglu_in(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` of ``x @ weight.T (+ bias)`` split in two along the output (gate
    rows of ``weight`` first). ``x (..., D)``, ``weight (2H, D)`` -> ``(..., H)``. Under
    autocast the products run in the autocast dtype, as ``F.linear`` would."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    with torch.autocast(x.device.type, enabled=False):
        return _SwiGLUIn.apply(x, weight, bias, dtype)


class MLP(nn.Module):
    """``(B, T, dim) -> (B, T, dim)``.

    Plain: ``fc2(act(fc1(x)))``. Gated: ``fc1`` computes gate and up projections in one
    matrix multiply (output ``2 * hidden``: gate first, then up) and the block returns
    ``fc2(act(gate) * up)``; with SiLU (SwiGLU) that first half runs as :func:`swiglu_in`,
    the same arithmetic without strided gate/up halves.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", gated: bool = False, bias: bool = True,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; use one of {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.gated = gated
        self.fc1 = nn.Linear(dim, 2 * hidden if gated else hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated and self.act is F.silu:
            return self.drop(self.fc2(swiglu_in(x, self.fc1.weight, self.fc1.bias)))
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.drop(self.fc2(h))
