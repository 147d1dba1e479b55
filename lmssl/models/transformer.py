"""The shared transformer core: one block, one stack, causal or bidirectional per call.

GPT, Llama, BERT, the CPC context network and (later) ViT encoders are all this class
with different :class:`~lmssl.config.ModelConfig` values.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmssl.config import ModelConfig
from lmssl.nn import MLP, Attention, RotaryEmbedding, local_attention_mask, make_norm


def mlp_hidden(cfg: ModelConfig) -> int:
    """Hidden width of the MLP: explicit, 4 * dim, or 8/3 * dim rounded up to 64 when gated."""
    if cfg.mlp_hidden:
        return cfg.mlp_hidden
    if cfg.gated_mlp:
        return (int(8 * cfg.dim / 3) + 63) // 64 * 64
    return 4 * cfg.dim


class Block(nn.Module):
    """One transformer block ``(B, T, dim) -> (B, T, dim)``; ``index`` is its depth in the stack.

    Pre-norm: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``.
    Post-norm (original BERT): ``norm1(x + attn(x))`` then ``norm2(x + mlp(x))``.
    With ``first_attn_norm=False`` block 0's ``norm1`` is the identity (ModernBERT). ``local``
    says whether the stack feeds this block the local-attention mask (``local_attention``).
    """

    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.local = cfg.local_attention > 0 and index % cfg.global_every != 0
        self.norm1 = nn.Identity() if index == 0 and not cfg.first_attn_norm \
            else make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.bias, cfg.dropout)
        self.norm2 = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.bias)
        self.mlp = MLP(cfg.dim, mlp_hidden(cfg), cfg.activation, cfg.gated_mlp, cfg.bias, cfg.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), attn_mask, is_causal, rope)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, attn_mask, is_causal, rope))
        return self.norm2(x + self.mlp(x))


class Transformer(nn.Module):
    """Stack of :class:`Block` over embeddings: ``x (B, T, dim) -> (B, T, dim)``.

    ``attn_mask`` is a key-padding mask ``(B, T)`` (True = real token). ``is_causal=None``
    uses ``cfg.causal``. Rotary positions, when configured, are applied inside attention;
    other position schemes are added to ``x`` by the caller (see :mod:`lmssl.models.text`).

    Local/global attention (``cfg.local_attention > 0``, ModernBERT): the blocks marked
    ``local`` get a sliding-window mask ``(B|1, 1, T, T)``, built once per call, and the
    rotary table of ``cfg.local_rope_theta``; the global ones get ``attn_mask`` and
    ``cfg.rope_theta``. Without local blocks nothing of this runs.

    ``checkpoint_activations`` (off by default; see :func:`set_activation_checkpointing`):
    while gradients are on, each block keeps only its input and recomputes its activations
    in the backward pass: activation memory drops from every block's intermediates to one
    block's, for about one more forward pass of compute.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.bias) if cfg.norm_position == "pre" else nn.Identity()
        head_dim = cfg.dim // cfg.n_heads
        rotary = cfg.positions == "rope"
        self.rope = RotaryEmbedding(head_dim, cfg.max_positions, cfg.rope_theta) if rotary else None
        self.has_local = any(block.local for block in self.blocks)
        local_theta = cfg.local_rope_theta or cfg.rope_theta  # None below: the local blocks share self.rope
        self.local_rope = RotaryEmbedding(head_dim, cfg.max_positions, local_theta) \
            if rotary and self.has_local and local_theta != cfg.rope_theta else None
        self.checkpoint_activations = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        causal = self.cfg.causal if is_causal is None else is_causal
        T = x.shape[1]
        rope = self.rope.cos_sin(T, x.device, x.dtype) if self.rope is not None else None
        local = None  # (mask, rope) of the local blocks
        if self.has_local:
            local_rope = self.local_rope.cos_sin(T, x.device, x.dtype) if self.local_rope is not None else rope
            local = (local_attention_mask(attn_mask, T, self.cfg.local_attention, x.device), local_rope)
        recompute = self.checkpoint_activations and torch.is_grad_enabled()
        for block in self.blocks:
            mask, pos = local if block.local else (attn_mask, rope)
            if recompute:  # dropout draws are replayed: the RNG state is saved with the input
                x = checkpoint(block, x, mask, causal, pos, use_reentrant=False)
            else:
                x = block(x, mask, causal, pos)
        return self.norm(x)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout) inside the block, back in its previous mode after,
    even when the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def set_activation_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Turn activation checkpointing on (or off) in every :class:`Transformer` inside
    ``module``; returns how many there are."""
    cores = [m for m in module.modules() if isinstance(m, Transformer)]
    for core in cores:
        core.checkpoint_activations = enabled
    return len(cores)


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """N(0, std) weights, zero biases, unit norms. Pre-norm (GPT-2 style): residual output
    projections scaled by ``1 / sqrt(2 * n_layers)``, since every block adds to one growing
    residual stream (``model.scale_residual_init``; ViTModel, timm and DINO leave them at
    ``init_std``). Post-norm (BERT): no scaling; each block's sum is normalised anyway,
    and shrinking the sublayer outputs only lets the input dominate every LayerNorm."""
    scaled = cfg.norm_position == "pre" and cfg.scale_residual_init
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if scaled else cfg.init_std
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = residual_std if name.endswith(("attn.proj", "mlp.fc2")) else cfg.init_std
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, cfg.init_std)
        elif isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith("positions.weight"):
            nn.init.normal_(p, 0.0, cfg.init_std)
