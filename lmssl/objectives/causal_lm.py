"""Causal language modelling (GPT): predict token t+1 from tokens <= t."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lmssl.config import ModelConfig, RunConfig
from lmssl.evaluate import language_metrics
from lmssl.losses.vocab import linear_cross_entropy
from lmssl.models import LMHead, TextBackbone
from lmssl.models.generate import generate
from lmssl.models.flops import transformer_flops_per_token
from lmssl.objectives import Objective, mean_pool, register


@register
class CausalLM(Objective):
    """Decoder backbone + LM head. ``batch["input_ids"] (B, T)`` -> next-token cross-entropy.

    Positions where the next token is padding (``attention_mask == 0``) are not scored.
    """

    name = "clm"
    modality = "text"
    description = "causal language modelling (next-token prediction, GPT-style)"
    loss_label = "loss (nats/token)"
    recipe = "gpt_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.max_positions=64",
                       "data.block_size=32", "train.sample_tokens=4")

    def __init__(self, cfg: ModelConfig, block_size: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.block_size = block_size or cfg.max_positions
        self.backbone = TextBackbone(cfg)
        self.head = LMHead(cfg, self.backbone.tokens)

    @classmethod
    def build(cls, cfg: RunConfig, tokenizer) -> CausalLM:
        return cls(cfg.model, cfg.data.block_size)

    def flops_per_token(self, seq_len: int) -> float:
        return transformer_flops_per_token(self.cfg, self.backbone.num_params(), seq_len)

    def flops_per_sample(self) -> float:
        return self.block_size * self.flops_per_token(self.block_size)

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the final hidden states over the real tokens, read causally: ``(B, dim)``."""
        mask = batch.get("attention_mask")
        return mean_pool(self.backbone(batch["input_ids"], mask, is_causal=True), mask)

    def eval_metrics(self, ev: dict[str, float], data, log) -> dict[str, float]:
        """Perplexity and bits per byte of the held-out loss."""
        return language_metrics(ev["loss"], data.bytes_per_token)

    def logits(self, input_ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T) -> (B, T, vocab_size)`` (padding rows of the vocabulary removed)."""
        return self.head(self.backbone(input_ids, attn_mask, is_causal=True))[..., : self.cfg.vocab_size]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        h = self.backbone(ids, attn, is_causal=True)  # (B, T, dim)
        targets = F.pad(ids[:, 1:], (0, 1), value=-100)  # (B, T): the last position has no next token
        if attn is not None:
            targets = targets.masked_fill(F.pad(attn[:, 1:], (0, 1)) == 0, -100)
        # projection + cross-entropy fused, in row chunks: the (B*T, vocab) logits never exist
        loss, correct, scored = linear_cross_entropy(self.head.transform(h.flatten(0, 1)), self.head.weight,
                                                     targets.flatten(), self.head.bias, vocab_size=self.cfg.vocab_size)
        return loss, {"loss": loss.detach(), "accuracy": correct / scored.clamp(min=1)}

    @torch.no_grad()
    def report(self, tokenizer, eval_batches: list[dict[str, torch.Tensor]], cfg: RunConfig, out_dir: Path) -> str:
        """Sample a continuation of ``train.sample_prompt``: the end-of-run picture for a decoder."""
        t = cfg.train
        return self.generate(tokenizer, t.sample_prompt, t.sample_tokens, temperature=0.8, top_k=50, seed=t.seed)

    def generate(self, tokenizer, prompt: str, max_new_tokens: int, **sampling) -> str:
        """Continue ``prompt`` (see :func:`lmssl.models.generate.generate` for ``sampling``)."""
        return generate(self.backbone, self.head, tokenizer, prompt, max_new_tokens, **sampling)
