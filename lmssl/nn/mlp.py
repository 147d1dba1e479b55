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


class MLP(nn.Module):
    """``(B, T, dim) -> (B, T, dim)``.

    Plain: ``fc2(act(fc1(x)))``. Gated: ``fc1`` computes gate and up projections in one
    matrix multiply (output ``2 * hidden``: gate first, then up) and the block returns
    ``fc2(act(gate) * up)``.
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
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.drop(self.fc2(h))
