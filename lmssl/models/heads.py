"""Output heads that map hidden states to vocabulary logits."""

from __future__ import annotations

import torch
from torch import nn

from lmssl.config import ModelConfig
from lmssl.nn import make_norm
from lmssl.nn.mlp import ACTIVATIONS


class LMHead(nn.Module):
    """``hidden (..., dim) -> logits (..., padded_vocab)``.

    Optionally a transform first (dense, activation, norm: the BERT MLM head), then the
    vocabulary projection, tied to the token embedding when ``tie_embeddings``. Callers
    that want logits only at some positions select those rows first (masked-only MLM).
    """

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        if cfg.head_transform:
            self.dense = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
            self.act = ACTIVATIONS[cfg.activation]
            self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.bias)
            nn.init.normal_(self.dense.weight, 0.0, cfg.init_std)
            if self.dense.bias is not None:
                nn.init.zeros_(self.dense.bias)
        else:
            self.dense = None
        rows = embedding.weight.shape[0]
        if cfg.tie_embeddings:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty(rows, cfg.dim).normal_(0.0, cfg.init_std))
        self.bias = nn.Parameter(torch.zeros(rows)) if cfg.head_bias else None

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """What comes before the vocabulary projection (identity without ``head_transform``).
        Objectives that fuse projection and loss (:mod:`lmssl.losses.vocab`) call this, then
        use ``weight`` and ``bias`` themselves."""
        return self.norm(self.act(self.dense(h))) if self.dense is not None else h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.transform(h), self.weight, self.bias)
