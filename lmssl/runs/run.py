"""A run folder: ``run.json`` (fingerprint + complete config), ``checkpoints/``, logs, pictures.

:func:`prepare_run_dir` claims a folder for a run (or finds the checkpoint to resume);
:func:`read_run_config` and :func:`load_run` read one back, for every command that uses a
trained run (probe, export, generate, fill-mask, fine-tune).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lmssl.config import RunConfig, config_from_dict
from lmssl.errors import UserError
from lmssl.runs import checkpoint as ckpt


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The config saved in ``run_dir/run.json``; one-line errors for a folder that is no run."""
    run_file = Path(run_dir) / "run.json"
    if not run_file.is_file():
        raise UserError(f"{run_dir} is not an lmssl run directory (no run.json); pass the train.output_dir of a run")
    try:
        return config_from_dict(json.loads(run_file.read_text())["config"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{run_file} is damaged (not the JSON lmssl writes); re-run the pretraining command") from None


def run_objective(run_dir: str | Path) -> str | None:
    """The objective name in ``run_dir/run.json`` without rebuilding the config (None: unreadable)."""
    try:
        return json.loads((Path(run_dir) / "run.json").read_text())["config"].get("objective", "clm")
    except (OSError, ValueError, KeyError, AttributeError):
        return None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild ``(objective, cfg, tokenizer)`` from a run directory's latest good checkpoint
    (``tokenizer`` is None for image runs); the objective is in eval mode on ``device``."""
    from lmssl import objectives
    from lmssl.data.tokenizer import resolve_tokenizer

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    c = ckpt.find_resumable(run_dir)
    if c is None:
        raise UserError(f"{run_dir} has no usable checkpoint yet; train it first (lmssl pretrain ...)")
    tokenizer = resolve_tokenizer(cfg, run_dir, may_train=False) if cfg.modality != "images" else None
    model = objectives.build(cfg, tokenizer)
    ckpt.load_weights(model, c.path / "model.safetensors")
    return model.to(device).eval(), cfg, tokenizer


def prepare_run_dir(cfg: RunConfig, is_main: bool, log, record: str = "run.json",
                    extra: dict | None = None) -> ckpt.Checkpoint | None:
    """Claim the output directory; return the checkpoint to resume from, if any.

    ``cfg``: a :class:`RunConfig` or any config the training loop takes (``train``,
    ``fingerprint()``, ``to_dict()``); ``record``: the file that holds its fingerprint and
    settings (``run.json`` for pretraining, ``finetune.json`` for fine-tuning); ``extra``:
    more keys for that file."""
    out = Path(cfg.train.output_dir)
    run_file = out / record
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text())
        except ValueError:
            previous = {}
        if previous.get("fingerprint") != cfg.fingerprint():
            if not cfg.train.overwrite:
                raise UserError(f"{out} holds a different run (its model, data or objective differ); choose another "
                                "train.output_dir, or pass train.overwrite=true to start over there")
            if is_main:
                log(f"overwriting the run in {out} (train.overwrite=true)")
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                (out / "log.jsonl").unlink(missing_ok=True)
        elif cfg.train.overwrite and is_main:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    elif (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) and not cfg.train.overwrite:
        raise UserError(f"{out} holds checkpoints but no {record}; choose another train.output_dir or pass "
                        "train.overwrite=true")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_file, json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.to_dict(),
                                                     **(extra or {})}, indent=1))
    return ckpt.find_resumable(out, log) if not cfg.train.overwrite or run_file.is_file() else None
