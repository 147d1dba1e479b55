"""One module per pretraining method: backbone + heads + what is hidden + loss.

Every objective is an ``nn.Module`` with

- ``forward(batch: dict[str, Tensor]) -> (loss, metrics)``: ``loss`` a scalar tensor,
  ``metrics`` a dict of detached scalar tensors (``loss`` among them) that the trainer
  averages and logs;
- ``prepare_batch(batch, generator) -> batch`` (optional): CPU-side work on a collated
  batch, such as MLM masking, driven by the given ``torch.Generator``;
- ``report(tokenizer, eval_batches, cfg, out_dir) -> str`` (optional): the end-of-run
  picture for this objective (generated text, filled masks, MAE's reconstructions drawn
  into ``out_dir``), returned as text for the console;
- ``flops_per_token: float``: training FLOPs per input token for MFU.

``build(cfg, tokenizer)`` creates the objective named by ``cfg.objective``: clm, mlm, cpc
on text; mae on images (``batch["pixel_values"]``, no tokenizer: ``tokenizer`` is None,
``flops_per_image()`` instead of ``flops_per_token``).
"""

from __future__ import annotations

import importlib

from torch import nn

from lmssl.config import RunConfig

OBJECTIVES = {"clm": "lmssl.objectives.causal_lm", "mlm": "lmssl.objectives.mlm", "cpc": "lmssl.objectives.cpc",
              "mae": "lmssl.objectives.mae"}


def build(cfg: RunConfig, tokenizer) -> nn.Module:
    """Instantiate ``cfg.objective`` with the model config completed from the tokenizer."""
    module = importlib.import_module(OBJECTIVES[cfg.objective])
    return module.build(cfg, tokenizer)
