"""Vision wrapper around the shared core: image patches (+ fixed 2-D positions) -> hidden states.

A ViT is the same :class:`~lmssl.models.transformer.Transformer` that GPT and BERT use,
fed patch embeddings instead of token embeddings, with a class token in front.
"""

from __future__ import annotations

import torch
from torch import nn

from lmssl.config import ModelConfig, VisionConfig
from lmssl.masking import gather_tokens
from lmssl.models.transformer import Transformer, init_weights
from lmssl.nn import PatchEmbedding, patchify, sincos_positions_2d


class VisionBackbone(nn.Module):
    """``images (B, C, H, W) -> hidden (B, 1 + N, dim)``, or ``(B, 1 + K, dim)`` when given
    the ``K`` patch positions to keep (MAE's encoder runs on those only).

    Row 0 is the class token. Patches are embedded by :class:`PatchEmbedding` and get fixed
    2-D sin-cos positions (``model.positions`` must be ``sincos``); the class token has
    none. The core is bidirectional.
    """

    def __init__(self, cfg: ModelConfig, vision: VisionConfig) -> None:
        super().__init__()
        if cfg.positions != "sincos":
            raise ValueError(f"the vision backbone uses fixed 2-D sin-cos positions; set model.positions=sincos "
                             f"(got '{cfg.positions}')")
        if vision.image_size % vision.patch_size:
            raise ValueError(f"vision.image_size={vision.image_size} must be a multiple of "
                             f"vision.patch_size={vision.patch_size}")
        self.cfg, self.vision = cfg, vision
        self.grid = (vision.image_size // vision.patch_size,) * 2  # (gh, gw)
        self.patches = PatchEmbedding(vision.patch_size, vision.channels, cfg.dim, bias=cfg.bias)
        self.register_buffer("positions", sincos_positions_2d(*self.grid, cfg.dim), persistent=False)  # (N, dim)
        self.cls = nn.Parameter(torch.zeros(cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.core = Transformer(cfg)
        init_weights(self, cfg)
        nn.init.normal_(self.cls, 0.0, cfg.init_std)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, N, p * p * C)``, checking the geometry against the config."""
        C, H, W = images.shape[1:]
        v = self.vision
        if (C, H, W) != (v.channels, v.image_size, v.image_size):
            raise ValueError(f"images of shape {tuple(images.shape[1:])} given to a model configured for "
                             f"({v.channels}, {v.image_size}, {v.image_size}); resize the images or set vision.*")
        return patchify(images, v.patch_size)

    def embed(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with positions ``(B, N or K, dim)``; with ``keep_idx (B, K)`` only
        the kept patches are embedded."""
        patches = self.patchify(images)  # (B, N, p*p*C)
        positions = self.positions.to(patches.dtype).expand(patches.shape[0], -1, -1)  # (B, N, dim)
        if keep_idx is not None:
            patches, positions = gather_tokens(patches, keep_idx), gather_tokens(positions, keep_idx)
        return self.patches(patches) + positions

    def with_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token: ``(B, L, dim) -> (B, 1 + L, dim)``."""
        return torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self.embed(images, keep_idx))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The core over ``[cls, tokens]``: ``(B, L, dim) -> (B, 1 + L, dim)``."""
        return self.core(self.drop(self.with_cls(tokens)), is_causal=False)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (the class token counted as embedding)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.cls.numel() if non_embedding else n
