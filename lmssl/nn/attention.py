"""Multi-head self-attention on PyTorch's scaled-dot-product kernel (SDPA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmssl.nn.positional import apply_rotary


def key_padding_to_sdpa(attn_mask: torch.Tensor | None, is_causal: bool, length: int) -> tuple[torch.Tensor | None, bool]:
    """Turn a key-padding mask ``(B, T)`` (True = real token) into what SDPA takes.

    Returns ``(mask, is_causal)``: ``(B, 1, 1, T)`` boolean for bidirectional attention,
    ``(B, 1, T, T)`` when it must be combined with causality (SDPA refuses both at once),
    or ``(None, is_causal)`` when there is no padding. A mask that is already 4-D (see
    :func:`local_attention_mask`) is used as it is, and combined with causality if asked.
    """
    if attn_mask is None:
        return None, is_causal
    mask = attn_mask if attn_mask.dim() == 4 else attn_mask.bool()[:, None, None, :]  # (B|1, 1, 1|T, T)
    if is_causal:
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        mask = mask & causal  # (B|1, 1, T, T)
    return mask, False


def local_attention_mask(attn_mask: torch.Tensor | None, length: int, window: int,
                         device: torch.device) -> torch.Tensor | None:
    """Sliding-window attention as a boolean SDPA mask: query ``i`` may attend to key ``j``
    when ``|i - j| <= window // 2`` (ModernBERT's local attention) and ``j`` is a real token.

    ``attn_mask`` is the key-padding mask ``(B, T)`` (True = real token) or None. Returns
    ``(B, 1, T, T)``, or ``(1, 1, T, T)`` without padding. A padded query whose window
    holds no real token keeps its own position, so that no row is empty (an empty row is
    NaN in some SDPA kernels). When the window spans the whole sequence the mask changes
    nothing and ``attn_mask`` is returned as it is (global attention, no ``T x T`` mask).
    """
    half = window // 2
    if length - 1 <= half:
        return attn_mask
    pos = torch.arange(length, device=device)
    band = (pos[:, None] - pos[None, :]).abs() <= half  # (T, T)
    if attn_mask is None:
        return band[None, None]  # (1, 1, T, T)
    mask = band & attn_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    return mask | torch.eye(length, dtype=torch.bool, device=device)


class Attention(nn.Module):
    """``x (B, T, dim) -> (B, T, dim)``; causal or bidirectional per call.

    One fused ``qkv`` projection (queries for ``n_heads`` heads, then keys and values for
    ``n_kv_heads`` heads each), optional rotary positions, SDPA, output projection.
    ``attn_mask`` is a key-padding mask ``(B, T)`` or a ready boolean mask ``(B|1, 1, T, T)``
    (local attention); True = may attend.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int = 0, bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        hs, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split([nh * hs, nkv * hs, nkv * hs], dim=-1)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        mask, causal = key_padding_to_sdpa(attn_mask, is_causal, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=nkv != nh)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, dim)
        return self.resid_drop(self.proj(y))
