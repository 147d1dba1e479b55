"""Normalisation layers: LayerNorm (GPT-2, BERT) or RMSNorm (Llama)."""

from __future__ import annotations

from torch import nn


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """Return a norm over the last dimension ``(..., dim)``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}'; use layernorm or rmsnorm")
