"""Causal language modelling (GPT): predict token t+1 from tokens <= t."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmssl.config import ModelConfig, RunConfig
from lmssl.losses.vocab import linear_cross_entropy
from lmssl.models import LMHead, TextBackbone
from lmssl.models.generate import generate
from lmssl.models.flops import transformer_flops_per_token


class CausalLM(nn.Module):
    """Decoder backbone + LM head. ``batch["input_ids"] (B, T)`` -> next-token cross-entropy.

    Positions where the next token is padding (``attention_mask == 0``) are not scored.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = TextBackbone(cfg)
        self.head = LMHead(cfg, self.backbone.tokens)

    def flops_per_token(self, seq_len: int) -> float:
        return transformer_flops_per_token(self.cfg, self.backbone.num_params(), seq_len)

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
        return generate(self.backbone, self.head, tokenizer, t.sample_prompt, t.sample_tokens, temperature=0.8,
                        top_k=50, seed=t.seed)


def build(cfg: RunConfig, tokenizer) -> CausalLM:
    return CausalLM(cfg.model)
