"""Token embeddings with the vocabulary padded for fast matrix multiplies."""

from __future__ import annotations

import torch
from torch import nn


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``multiple`` (no padding when multiple <= 1)."""
    if multiple <= 1:
        return vocab_size
    return (vocab_size + multiple - 1) // multiple * multiple


class TokenEmbedding(nn.Embedding):
    """``ids (B, T) -> (B, T, dim)``; rows past ``vocab_size`` exist only for alignment."""

    def __init__(self, vocab_size: int, dim: int, pad_multiple: int = 64) -> None:
        super().__init__(padded_vocab(vocab_size, pad_multiple), dim)
        self.vocab_size = vocab_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids)
