"""Autoregressive sampling from a decoder backbone and LM head (greedy, temperature, top-k, top-p)."""

from __future__ import annotations

import torch
from torch import nn

from lmssl.models.transformer import eval_mode


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """``logits (B, V) -> ids (B,)``. ``temperature <= 0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(backbone: nn.Module, head: nn.Module, ids: torch.Tensor, max_new_tokens: int, *,
                 temperature: float = 0.8, top_k: int = 50, top_p: float = 1.0, eos_id: int | None = None,
                 seed: int = 0) -> torch.Tensor:
    """``ids (B, T) -> (B, T + n)``. Recomputes the (short) context each step; the window
    slides when it reaches ``max_positions``."""
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    vocab = head.vocab_size
    limit = backbone.cfg.max_positions
    with eval_mode(backbone), eval_mode(head):
        for _ in range(max_new_tokens):
            ctx = ids[:, -limit:]
            logits = head(backbone(ctx, is_causal=True)[:, -1])[:, :vocab].float()  # (B, V)
            nxt = sample_next(logits, temperature, top_k, top_p, gen)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
    return ids


def generate(backbone: nn.Module, head: nn.Module, tokenizer, prompt: str, max_new_tokens: int, **kw) -> str:
    """Text in, text out: the prompt followed by the sampled continuation."""
    device = next(backbone.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
    out = generate_ids(backbone, head, ids, max_new_tokens, eos_id=tokenizer.eos_token_id, **kw)
    return tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
