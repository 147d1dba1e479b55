"""Tiny runs for the export and fine-tuning tests: real `lmssl pretrain` runs of a few steps,
and runs written directly the way the trainer writes them (run.json + a checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmssl.config import RunConfig, load_config
from lmssl.data.text import CORPUS_DIR
from lmssl.data.tokenizer import load_tokenizer
from lmssl.runs import checkpoint as ckpt
from lmssl.train.loop import train
from tests.conftest import ROOT, TINY

PRESETS = {  # family -> (recipe, overrides on top of tests.conftest.TINY)
    "gpt2": ("gpt_tiny.yaml", []),
    "llama": ("llama_tiny.yaml", ["model.preset=llama_tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
                                  "model.n_kv_heads=2", "model.mlp_hidden=96", "model.max_positions=64",
                                  "model.pad_vocab_multiple=100"]),  # 8192 -> 8200 rows: the export slices them off
    "bert": ("bert_tiny.yaml", ["model.preset=bert_tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=2",
                                "model.max_positions=64", "optim.warmup_steps=1"]),
    # 4 layers: blocks 1 and 2 are local, with a window (8 either side) shorter than the 32-token blocks
    "modernbert": ("mlm_tiny.yaml", ["model.preset=modernbert_tiny", "model.dim=64", "model.n_layers=4",
                                     "model.n_heads=4", "model.mlp_hidden=96", "model.max_positions=64",
                                     "model.local_attention=16", "optim.warmup_steps=1"]),
}


def small_corpus(folder: Path, chapters: int = 60) -> list[str]:
    """The first ``chapters`` lines of the bundled train and validation text: tokenized in a moment."""
    folder.mkdir(parents=True, exist_ok=True)
    overrides = []
    for split in ("train", "validation"):
        path = folder / f"kjv_{split}_head.txt"
        if not path.is_file():
            lines = (CORPUS_DIR / f"kjv_{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)
            path.write_text("".join(lines[:chapters]), encoding="utf-8")
        overrides.append(f"data.{split}_files=[{path}]")
    return overrides


def pretrain(out: Path, family: str = "gpt2", steps: int = 3, extra: list[str] = (), full_corpus: bool = False) -> Path:
    """A real pretraining run of ``steps`` steps (tiny model) on the head of the bundled corpus
    (or all of it)."""
    recipe, overrides = PRESETS[family]
    data = [] if full_corpus else small_corpus(out.parent / "corpus")
    cfg = load_config(ROOT / "recipes" / recipe,
                      TINY + overrides + data + [f"train.output_dir={out}", f"train.max_steps={steps}",
                                          f"train.eval_every={steps}", f"train.save_every={steps}",
                                          "train.sample_tokens=2", "data.eval_blocks=2", "mlm.fill_examples=1",
                                          *extra])
    train(cfg)
    return out


def tiny_config(preset: str, objective: str = "clm", *overrides: str, **model) -> RunConfig:
    """A complete config (vocabulary from the default tokenizer) without training."""
    cfg = load_config(None, [f"objective={objective}", f"model.preset={preset}", "model.dim=64", "model.n_layers=2",
                             "model.n_heads=4", "model.max_positions=64", "data.block_size=32", *overrides])
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.model.vocab_size = len(load_tokenizer("default"))
    return cfg


def write_run(run_dir: Path, cfg: RunConfig, objective: torch.nn.Module, step: int = 1) -> Path:
    """Save ``objective`` as run ``run_dir`` exactly as the trainer lays it out."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()}))
    state = {"step": step, "cursor": 0, "tokens_seen": 0, "metrics": {"loss": 1.0}}
    ckpt.save_checkpoint(run_dir, step, objective.state_dict(), {}, state, keep_last=1)
    return run_dir


def perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter away from its initial value (norm weights off 1, biases off 0),
    so a mapping that swaps or drops any tensor shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module
