"""Held-out evaluation shared by every text objective."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Iterable

import torch
from torch import nn

from lmssl.data.batches import to_device
from lmssl.models import eval_mode


@torch.no_grad()
def evaluate_objective(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device,
                       autocast=None) -> dict[str, float]:
    """Mean of the objective's metrics over fixed held-out batches (eval mode, no grad)."""
    sums: dict[str, float] = {}
    n = 0
    with eval_mode(model):
        for batch in batches:
            batch = to_device(batch, device)
            with autocast() if autocast is not None else nullcontext():
                _, metrics = model(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def language_metrics(loss_nats: float, bytes_per_token: float) -> dict[str, float]:
    """Perplexity and bits-per-byte from a mean per-token loss in nats.

    ``bpb = loss / ln 2 / bytes_per_token``: bits per token spread over the UTF-8 bytes
    each token covers on average, which compares models with different tokenizers.
    """
    return {"perplexity": math.exp(min(loss_nats, 50.0)), "bits_per_byte": loss_nats / math.log(2) / bytes_per_token}
