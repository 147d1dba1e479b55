"""Text wrapper around the shared core: token (+ position, + segment) embeddings -> hidden states."""

from __future__ import annotations

import torch
from torch import nn

from lmssl.config import ModelConfig
from lmssl.models.transformer import Transformer, init_weights
from lmssl.nn import LearnedPositions, TokenEmbedding, make_norm, sincos_positions


class TextBackbone(nn.Module):
    """``input_ids (B, T) -> hidden (B, T, dim)``.

    Embeddings: tokens, plus learned or sin-cos absolute positions (RoPE lives in the
    core), plus token-type embeddings when ``type_vocab_size > 0``, then an optional norm
    (BERT) and dropout, then the :class:`Transformer`. With ``embedding_dim`` set (and not
    ``dim``) the embeddings and their norm are ``embedding_dim`` wide and a linear map
    (``embed_project``, ELECTRA's ``embeddings_project``) takes them to ``dim``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is normally taken from the tokenizer)")
        self.cfg = cfg
        width = cfg.embedding_dim or cfg.dim  # of the embeddings, before embed_project
        self.tokens = TokenEmbedding(cfg.vocab_size, width, cfg.pad_vocab_multiple)
        self.positions = LearnedPositions(cfg.max_positions, width) if cfg.positions == "learned" else None
        if cfg.positions == "sincos":
            self.register_buffer("sincos", sincos_positions(cfg.max_positions, width), persistent=False)
        self.token_types = nn.Embedding(cfg.type_vocab_size, width) if cfg.type_vocab_size > 0 else None
        self.embed_norm = make_norm(cfg.norm, width, cfg.norm_eps, cfg.bias) if cfg.embedding_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.embed_project = nn.Linear(width, cfg.dim, bias=cfg.bias) if width != cfg.dim else None
        self.core = Transformer(cfg)
        init_weights(self, cfg)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T) -> (B, T, dim)`` embeddings before the core (``(B, T, embedding_dim)``
        before ``embed_project``)."""
        T = input_ids.shape[1]
        if T > self.cfg.max_positions:
            raise ValueError(f"sequence of {T} tokens is longer than model.max_positions={self.cfg.max_positions}")
        x = self.tokens(input_ids)
        if self.positions is not None:
            x = x + self.positions(torch.arange(T, device=input_ids.device))
        elif self.cfg.positions == "sincos":
            x = x + self.sincos[:T].to(x.dtype)
        if self.token_types is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.token_types(types)
        x = self.drop(self.embed_norm(x))
        return self.embed_project(x) if self.embed_project is not None else x

    def forward(self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        return self.core(self.embed(input_ids, token_type_ids), attn_mask, is_causal)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tokens.weight.numel()
            if self.positions is not None:
                n -= self.positions.weight.numel()
        return n
