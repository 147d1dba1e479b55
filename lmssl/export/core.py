"""Export a run directory to a folder that stock ``transformers`` loads, and check it.

:func:`export_run` loads the run's newest good checkpoint, converts it with the
converter registered for its objective and family (:mod:`lmssl.export.transformers_map`),
writes ``config.json``, ``model.safetensors`` (sharded past ``max_shard_size``),
``generation_config.json`` (decoders), the tokenizer, the loss curve and a model card into
a temporary sibling folder, reloads that folder with the ``Auto*`` classes, compares
outputs with the lmssl model on the same batch in float32, and only then moves it to
``out_dir``. A run with no exact twin gets the lmssl-format export of
:mod:`lmssl.export.native` instead.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmssl.config import RunConfig
from lmssl.errors import UserError
from lmssl.export import native
from lmssl.export.card import AUTO_CLASSES, CardFacts, render
from lmssl.export.transformers_map import Converted, FamilyMismatch, NoExactTwin, find_converter

MAX_DIFF = 1e-4  # largest |difference| of logits (or hidden states) the export check accepts
METRIC_KEYS = ("loss", "eval_loss", "eval_perplexity", "eval_bits_per_byte", "eval_accuracy", "eval_knn_accuracy",
               "eval_probe_accuracy", "eval_normalized_std", "eval_effective_rank")


@dataclass
class ExportResult:
    out_dir: Path
    architecture: str  # transformers class, or "lmssl TextBackbone"
    kind: str  # causal-lm | masked-lm | backbone | native
    checks: dict[str, float] = field(default_factory=dict)  # check name -> max |difference|


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
               license: str = "apache-2.0", max_shard_size: str | int = "2GB", lmssl_format: bool = False,
               card_name: str | None = None, log: Callable[[str], None] = print) -> ExportResult:
    """Export the newest good checkpoint of ``run_dir`` into ``out_dir`` (see the module docstring).

    Raises :class:`UserError` (one line) for a folder that is not a run, a missing tokenizer,
    an occupied ``out_dir`` without ``overwrite``, a run whose config deviates from its
    family, or an export whose outputs differ from lmssl's by more than :data:`MAX_DIFF`."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = _read_run(run_dir)
    _check_out_dir(out_dir, overwrite, run_dir)
    if not lmssl_format:
        _converter_or_none(cfg, lambda msg: None)  # a family mismatch fails before the weights are loaded
    objective, cfg, tokenizer = _load(run_dir)
    return export_model(objective, cfg, tokenizer, out_dir, run_dir=run_dir, overwrite=overwrite, license=license,
                        max_shard_size=max_shard_size, lmssl_format=lmssl_format, card_name=card_name, log=log)


def export_model(objective: nn.Module, cfg: RunConfig, tokenizer, out_dir: str | os.PathLike, *,
                 run_dir: str | os.PathLike | None = None, overwrite: bool = False, license: str = "apache-2.0",
                 max_shard_size: str | int = "2GB", lmssl_format: bool = False, card_name: str | None = None,
                 log: Callable[[str], None] = print) -> ExportResult:
    """Export an in-memory objective (``.backbone`` and, for LM twins, ``.head``) with its
    config and tokenizer; ``run_dir`` (optional) supplies the metrics and loss curve of the card."""
    out_dir = Path(out_dir)
    run_dir = Path(run_dir) if run_dir is not None else None
    _check_out_dir(out_dir, overwrite, run_dir)
    images = cfg.modality == "images"
    converter = None if lmssl_format else _converter_or_none(cfg, log)
    if images and converter is None:
        raise UserError(f"an image ({cfg.objective}) run exports only as its transformers twin (model.family=vit); "
                        "this one has none, so use its checkpoint (model.safetensors in the run directory) directly")
    objective.float().eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if images:
            _save_image_processor(cfg, tmp)
        else:
            tokenizer.model_max_length = cfg.model.max_positions
            _save_tokenizer(tokenizer, tmp)
        if converter is None:
            native.save_native(objective, cfg, tmp)
            checks = {"backbone hidden states (lmssl reload)": _verify_native(objective, cfg, tokenizer, tmp)}
            result = ExportResult(out_dir, "lmssl TextBackbone", "native", checks)
            n_params = sum(p.numel() for p in objective.backbone.parameters())
            pipeline_tag, notes, usage = None, [], ""
            card_extra = ""
        else:
            conv = converter(objective, cfg, tokenizer)
            for name, state in conv.extra_files.items():
                from lmssl.runs.checkpoint import save_weights

                save_weights(state, tmp / name)
            if conv.write is not None:
                conv.write(tmp)
            if conv.model_class is None:  # no transformers class: the extra files are the export
                n_params = sum(p.numel() for p in objective.backbone.parameters())
            else:
                hf = build_model(conv)
                if conv.kind == "causal-lm":
                    from transformers import GenerationConfig

                    hf.generation_config = GenerationConfig(bos_token_id=hf.config.bos_token_id,
                                                            eos_token_id=hf.config.eos_token_id,
                                                            pad_token_id=hf.config.pad_token_id)
                with quiet_transformers():
                    hf.save_pretrained(str(tmp), max_shard_size=max_shard_size)
                n_params = hf.num_parameters()
                del hf
            with quiet_transformers():
                checks = conv.check(objective, cfg, tmp) if conv.check else verify(objective, conv, cfg, tokenizer, tmp)
            architecture = conv.model_class.__name__ if conv.model_class is not None else \
                ", ".join(f"`{n}`" for n in conv.extra_files)
            result = ExportResult(out_dir, architecture, conv.kind, checks)
            pipeline_tag, notes, usage = conv.pipeline_tag, conv.notes, conv.usage
            card_extra = conv.card
        for name, diff in checks.items():
            log(f"export check: {name}: max |diff| {diff:.3g}")
        worst = max(checks.values())
        if not worst <= MAX_DIFF:  # also catches NaN
            raise UserError(f"export check failed: max |difference| {worst:.3g} > {MAX_DIFF:g} between lmssl and the "
                            f"reloaded {result.architecture}; nothing was written to {out_dir} (a mapping bug: please "
                            "report it with the run's config)")
        curve = run_dir / "loss_curve.png" if run_dir is not None else None
        if curve is not None and curve.is_file():
            shutil.copyfile(curve, tmp / "loss_curve.png")
        facts = _card_facts(run_dir, cfg, result, n_params, license, pipeline_tag, notes,
                            "loss_curve.png" if curve is not None and curve.is_file() else None, usage, card_extra)
        (tmp / "README.md").write_text(render(facts, card_name or out_dir.name), encoding="utf-8")
        _readable(tmp)
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


# ----------------------------------------------------------------------------- run loading


def _read_run(run_dir: Path) -> RunConfig:
    """The run's config, after checking that it is a run with a loadable tokenizer (text runs)."""
    from lmssl.data.tokenizer import resolve_tokenizer
    from lmssl.runs import read_run_config

    cfg = read_run_config(run_dir)
    if cfg.modality == "images":  # images: no tokenizer to ship
        return cfg
    try:
        resolve_tokenizer(cfg, run_dir, may_train=False)
    except UserError as e:
        raise UserError(f"the run's tokenizer '{cfg.data.tokenizer}' cannot be loaded ({e}); the export ships the "
                        "tokenizer, so restore it at that path and export again") from None
    return cfg


def _load(run_dir: Path) -> tuple[nn.Module, RunConfig, object]:
    from lmssl.runs import load_run

    try:
        return load_run(run_dir)
    except ModuleNotFoundError as e:
        raise UserError(f"this lmssl cannot rebuild the run's objective ({e.name} is missing); update lmssl") from None


def _converter_or_none(cfg: RunConfig, log: Callable[[str], None]):
    """The registered converter, or None (with a note) when the run has no exact twin."""
    try:
        return find_converter(cfg)
    except NoExactTwin as e:
        log(f"note: {e}; exporting the backbone weights as safetensors + note")
        return None
    except FamilyMismatch as e:
        raise FamilyMismatch(f"{e}; pass --lmssl-format to export the lmssl weights instead") from None


def _check_out_dir(out_dir: Path, overwrite: bool, run_dir: Path | None) -> None:
    if run_dir is not None:
        r, o = run_dir.resolve(), out_dir.resolve()
        if o == r or o in r.parents or r in o.parents:
            raise UserError(f"OUT_DIR {out_dir} overlaps the run directory {run_dir}; export to a separate folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; OUT_DIR must be a folder (it is created if missing)")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty; choose another OUT_DIR or pass --overwrite to replace it")


def _save_tokenizer(tokenizer, folder: Path) -> None:
    from lmssl.data.tokenizer import _save  # save_pretrained + the class name both transformers 4 and 5 load

    _save(tokenizer, folder)


def _save_image_processor(cfg: RunConfig, folder: Path) -> None:
    """What turns a PIL image into the model's input: resize to the training size, scale to
    [0, 1], normalise with the run's mean and std."""
    from transformers import ViTImageProcessor

    v = cfg.vision
    with quiet_transformers():  # "torchvision not installed: the PIL backend is used" is fine here
        processor = ViTImageProcessor(do_resize=True, size={"height": v.image_size, "width": v.image_size}, resample=3,
                                      do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                      image_mean=list(v.mean), image_std=list(v.std))
    processor.save_pretrained(str(folder))


@contextmanager
def quiet_transformers():
    """transformers' progress bars and warnings off for the duration (they are expected here)."""
    from transformers.utils import logging as tlog

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _readable(folder: Path) -> None:
    """Files as the user's umask would make them (some writers create 0600 temporaries)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder in; an old ``out_dir`` is removed only once the new one is there."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- build and verify


def build_model(conv: Converted):
    """Instantiate ``conv.model_class`` and load the converted weights; any name mismatch is a mapping bug."""
    model = conv.model_class(conv.config)
    missing, unexpected = model.load_state_dict(conv.state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(conv.fresh)]
    if missing or unexpected:
        raise UserError(f"internal mapping error for {conv.model_class.__name__}: missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}; please report it with the run's config")
    return model.float().eval()


def probe_batch(cfg: RunConfig, length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` each ``(2, T)``: random real-vocabulary ids; the second row's last
    quarter is padding (mask 0) so padded attention is checked too."""
    T = min(length, cfg.model.max_positions)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, cfg.model.vocab_size, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T - max(1, T // 4):] = 0
    return ids, mask


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Max |a - b| over the real (mask 1) positions of ``(B, T, ...)`` tensors."""
    keep = mask.bool()
    return float((a.float()[keep] - b.float()[keep]).abs().max())


@torch.no_grad()
def verify(objective: nn.Module, conv: Converted, cfg: RunConfig, tokenizer, folder: Path) -> dict[str, float]:
    """Reload ``folder`` with the Auto class of ``conv.kind`` (and ``AutoModel`` for the bare
    backbone) and compare with the lmssl objective on :func:`probe_batch`, in float32."""
    import transformers

    ids, mask = probe_batch(cfg, min(conv.probe_length, conv.positions or conv.probe_length))
    V = cfg.model.vocab_size
    if conv.reference is not None:
        hidden = conv.reference(ids, mask)  # (B, T, dim)
    else:
        causal = {"causal-lm": True, "masked-lm": False}.get(conv.kind, cfg.model.causal)
        hidden = objective.backbone(ids, mask, is_causal=causal)  # (B, T, dim)
    checks = {}
    with quiet_transformers():  # "newly initialised pooler" etc.: expected, and stated in the card
        if conv.kind != "backbone":
            auto = getattr(transformers, AUTO_CLASSES[conv.kind])
            model = auto.from_pretrained(str(folder), dtype=torch.float32).eval()
            ours = objective.head(hidden)[..., :V]  # (B, T, V)
            theirs = model(input_ids=ids, attention_mask=mask).logits[..., :V]
            checks[f"logits ({auto.__name__})"] = _max_diff(ours, theirs, mask)
            del model
        model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        theirs = model(input_ids=ids, attention_mask=mask).last_hidden_state
        checks["hidden states (AutoModel)"] = _max_diff(hidden, theirs, mask)
    return checks


@torch.no_grad()
def _verify_native(objective: nn.Module, cfg: RunConfig, tokenizer, folder: Path) -> float:
    ids, mask = probe_batch(cfg)
    backbone, _, _ = native.load_native(folder)
    ours = objective.backbone(ids, mask, is_causal=cfg.model.causal)
    return _max_diff(ours, backbone(ids, mask, is_causal=cfg.model.causal), mask)


# ----------------------------------------------------------------------------- card


def _card_facts(run_dir: Path | None, cfg: RunConfig, result: ExportResult, n_params: int, license: str,
                pipeline_tag: str | None, notes: list[str], loss_curve: str | None, usage: str = "",
                extra: str = "") -> CardFacts:
    from lmssl.runs import checkpoint as ckpt

    c = ckpt.find_resumable(run_dir, log=lambda msg: None) if run_dir is not None else None
    state = ckpt.load_trainer_state(c.path) if c is not None else {}
    metrics = dict(state.get("metrics", {}))
    final = run_dir / "final_metrics.json" if run_dir is not None else None
    if final is not None and final.is_file():
        try:
            saved = json.loads(final.read_text())
            if saved.get("step") == state.get("step"):
                metrics.update(saved)
        except ValueError:
            pass
    shown = {k: float(metrics[k]) for k in METRIC_KEYS if isinstance(metrics.get(k), (int, float))}
    load_snippet = native.how_to_load(result.out_dir.name) if result.kind == "native" else ""
    probe_table = ""
    if run_dir is not None and (run_dir / "probe.json").is_file():
        try:
            probe = json.loads((run_dir / "probe.json").read_text())
            if probe.get("step", state.get("step")) == state.get("step"):
                probe_table = probe.get("table", "")
        except ValueError:
            pass
    if result.kind == "native":
        notes = ["no exact transformers equivalent exists for this architecture, so this folder holds the lmssl "
                 "backbone weights; it does not load with `transformers`"] + notes
    return CardFacts(cfg=cfg, run_dir=str(run_dir) if run_dir is not None else "(in memory)", step=int(state.get("step", 0)),
                     tokens_seen=int(state.get("tokens_seen", 0)), metrics=shown, n_params=n_params, license=license,
                     architecture=result.architecture, kind=result.kind, pipeline_tag=pipeline_tag,
                     checks=result.checks, loss_curve=loss_curve, notes=notes, load_snippet=load_snippet,
                     usage=usage, probe_table=probe_table, extra=extra)
