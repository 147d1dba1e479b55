"""Input embeddings: tokens (vocabulary padded for fast matrix multiplies) and image patches."""

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


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``images (B, C, H, W) -> patches (B, N, p * p * C)`` with ``N = (H / p) * (W / p)``.

    Patches are in row-major grid order; the features of one patch are its pixels in
    row-major order with the channels innermost ``(p, p, C)`` (MAE's and ViTMAE's layout,
    so reconstruction targets match theirs).
    """
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image of {H}x{W} pixels is not a whole number of {p}x{p} patches")
    x = images.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, p, gw, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, gh * gw, p * p * C) -> (B, C, gh * p, gw * p)``."""
    B = patches.shape[0]
    (gh, gw), p, C = grid, patch_size, channels
    x = patches.reshape(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, gh, p, gw, p)
    return x.reshape(B, C, gh * p, gw * p)


class PatchEmbedding(nn.Linear):
    """``patches (B, N, p * p * C) -> (B, N, dim)``: one linear map per flattened patch.

    The same as a ``Conv2d`` with kernel and stride ``p`` on the image (a convolution
    weight ``(dim, C, p, p)`` is this weight viewed ``(dim, p, p, C)`` and permuted), but
    taking patches lets an encoder embed only the patches it keeps.
    """

    def __init__(self, patch_size: int, channels: int, dim: int, bias: bool = True) -> None:
        super().__init__(patch_size * patch_size * channels, dim, bias=bias)
        self.patch_size = patch_size
        self.channels = channels
