"""Training FLOPs of the shared core, the numerator of MFU (the device peaks live in lmssl.train.flops)."""

from __future__ import annotations

from lmssl.config import ModelConfig


def transformer_flops_per_token(cfg: ModelConfig, non_embedding_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): ``6 N`` for the weight
    matrices including the vocabulary projection, plus ``12 L T d`` for attention scores."""
    vocab_proj = cfg.dim * cfg.vocab_size
    return 6.0 * (non_embedding_params + vocab_proj) + 12.0 * cfg.n_layers * seq_len * cfg.dim
