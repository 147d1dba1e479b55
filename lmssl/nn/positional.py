"""Position information: learned table, fixed sin-cos table, or rotary (RoPE)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnedPositions(nn.Module):
    """Learned absolute positions: ``positions (T,) or (B, T) -> (…, T, dim)``."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, dim))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


def sincos_positions(length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Fixed sinusoidal table ``(length, dim)``: sin on even features, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table.float()


def sincos_positions_2d(grid_h: int, grid_w: int, dim: int, base: float = 10000.0,
                        extent: tuple[int, int] | None = None) -> torch.Tensor:
    """Fixed 2-D sinusoidal table ``(grid_h * grid_w, dim)`` for a patch grid, row-major.

    Each quarter of the features encodes one coordinate with ``dim / 4`` frequencies:
    ``[sin(col), cos(col), sin(row), cos(row)]``, MAE's layout (and so ViTMAE's).

    ``extent=(H, W)``: the grid the model was trained on. A grid of another size then gets
    the positions of the same image extent at fractional coordinates (the centre of patch
    ``i`` of ``grid_h`` sits at ``(i + 1/2) * H / grid_h - 1/2``), the sin-cos analogue of interpolating a
    position table: a small local crop or a larger fine-tuning image covers the positions
    the model knows. ``extent`` equal to the grid gives the integer table.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    omega = 1.0 / base ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    H, W = (grid_h, grid_w) if extent is None else extent
    ys = (torch.arange(grid_h, dtype=torch.float64) + 0.5) * (H / grid_h) - 0.5  # (gh,) patch centres
    xs = (torch.arange(grid_w, dtype=torch.float64) + 0.5) * (W / grid_w) - 0.5  # (gw,)
    rows, cols = torch.meshgrid(ys, xs, indexing="ij")  # (gh, gw) each
    col = cols.flatten()[:, None] * omega  # (N, dim/4)
    row = rows.flatten()[:, None] * omega
    return torch.cat([col.sin(), col.cos(), row.sin(), row.cos()], dim=1).float()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding with the half-split layout (feature i pairs with i + hs/2).

    ``cos_sin(T, device, dtype) -> (cos, sin)`` each ``(T, hs)``; :func:`apply_rotary`
    rotates ``q`` or ``k`` of shape ``(B, nh, T, hs)``.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.max_positions = max_positions

    def cos_sin(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (T, hs/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x (B, nh, T, hs)``, ``cos/sin (T, hs)`` -> rotated ``x`` of the same shape."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
