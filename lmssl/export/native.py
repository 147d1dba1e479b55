"""The export for runs with no exact ``transformers`` twin: lmssl backbone weights + config.

Folder layout::

    model.safetensors    the TextBackbone state dict (lmssl names, padded vocabulary rows kept)
    lmssl_config.json    the run's full config (vocab_size filled in) and what produced it
    tokenizer files      as for a transformers export
    README.md            how to load it with lmssl

Load it back with :func:`load_native`, which needs lmssl but no run directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lmssl.config import RunConfig, config_from_dict
from lmssl.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "lmssl_config.json"
FORMAT = "lmssl-backbone/1"


def save_native(objective: nn.Module, cfg: RunConfig, out_dir: Path) -> None:
    """Write the backbone of ``objective`` and the config into ``out_dir``."""
    from lmssl.runs.checkpoint import save_weights

    backbone = getattr(objective, "backbone", None)
    if backbone is None:
        raise UserError(f"the '{cfg.objective}' objective has no .backbone module to export; it cannot be exported yet")
    save_weights(backbone.state_dict(), out_dir / WEIGHTS, metadata={"format": "pt", "lmssl_format": FORMAT})
    record = {"format": FORMAT, "module": "lmssl.models.TextBackbone", "config": cfg.to_dict()}
    (out_dir / CONFIG).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def load_native(folder: str | Path, device: str | torch.device = "cpu"):
    """``(TextBackbone, RunConfig, tokenizer)`` from a folder written by :func:`save_native`."""
    from transformers import AutoTokenizer

    from lmssl.models import TextBackbone
    from lmssl.runs.checkpoint import load_weights

    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder} has no {CONFIG}; it is not an lmssl-format export (use transformers to load it)")
    record = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    cfg = config_from_dict(record["config"])
    backbone = TextBackbone(cfg.model)
    load_weights(backbone, folder / WEIGHTS)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return backbone.to(device).eval(), cfg, tokenizer


def how_to_load(folder_name: str) -> str:
    return f"""```python
from lmssl.export.native import load_native

backbone, cfg, tokenizer = load_native("{folder_name}")   # an lmssl.models.TextBackbone
ids = tokenizer("And God said", return_tensors="pt")["input_ids"]
hidden = backbone(ids, is_causal=cfg.model.causal)       # (batch, tokens, {{dim}}) hidden states
```

`model.safetensors` holds the `TextBackbone` state dict under lmssl's own names (see
`lmssl/models/text.py`); `lmssl_config.json` holds the complete run config, including
`model` (the architecture) and `data.tokenizer`. The vocabulary projection of the
pretraining head is the token embedding (`tokens.weight`) when `model.tie_embeddings`
is true; rows past the tokenizer's vocabulary size are alignment padding."""
