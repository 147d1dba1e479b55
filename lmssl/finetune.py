"""Fine-tune a pretrained model on a labelled text task, always through its ``transformers`` twin.

``lmssl finetune MODEL [options]`` or ``lmssl finetune --recipe recipes/finetune_tiny.yaml``.

MODEL is one of

- an lmssl run directory (it holds ``run.json``): exported first with :mod:`lmssl.export`
  (verified against lmssl) into ``OUTPUT_DIR/base_model``;
- a folder written by ``lmssl export`` or any ``save_pretrained`` checkpoint folder;
- a Hugging Face Hub model name such as ``gpt2`` or ``bert-base-cased`` (needs network).

It is loaded with ``AutoModelForSequenceClassification`` (``--task sequence``: one label
per text) or ``AutoModelForTokenClassification`` (``--task token``: one label per word;
the text column holds lists of words and the label column lists of tags; only the first
sub-word of each word is scored). ``--from-scratch`` builds the same architecture with
fresh random weights (same tokenizer, same seed), for the "does pretraining help?" comparison.

Data: local ``.csv``/``.json``/``.jsonl``/``.parquet`` files (``--train-file``,
``--validation-file``) read with ``datasets.load_dataset``, or a Hub dataset
(``--dataset NAME [--dataset-config CFG]``, its ``train`` and ``validation`` splits), or,
when neither is given, the bundled task: which division of the Bible a 3-verse passage
comes from (6 classes). String labels are mapped to ids (sorted); ``label2id``/``id2label``
are saved in the model config. Without a validation file or split,
``--validation-fraction`` of the training examples is held out.

Training is a short Accelerate loop: AdamW with decay on matrices only and linear
warm-up/decay (:mod:`lmssl.train.optim`), gradient clipping at 1, evaluation (loss,
accuracy, macro-F1) every epoch or every ``--eval-every`` steps, early stopping after
``--patience`` evaluations without improvement of ``--metric``.

Output folder::

    finetune.json        the settings, the label map and where the model came from
    base_model/          the exported lmssl run (when MODEL was a run directory)
    best/                the best model + tokenizer (a *ForSequenceClassification folder) + eval_results.json
    last/                the state after the last finished epoch (for --resume)
    log.jsonl, loss_curve.png, metrics.json

Resume (``--resume``) is at epoch granularity: the run restarts from ``last/`` (weights,
optimizer, schedule, best score, early-stopping count) at the start of the epoch after the
last finished one; steps taken inside an unfinished epoch are redone, with the same data
order (each epoch's order is seeded by ``seed + epoch``). Dropout draws after a resume
differ from an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmssl.errors import UserError

CORPUS_DIR = Path(__file__).resolve().parent / "data" / "corpus"
BUNDLED_TASK = {"train": CORPUS_DIR / "genre_train.jsonl", "validation": CORPUS_DIR / "genre_validation.jsonl"}
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _opt(default: Any, help: str) -> Any:
    """A config field with its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run; a YAML recipe and the command-line options fill it."""

    model: str = _opt("", "lmssl run directory, exported/transformers folder, or Hub model name")
    task: str = _opt("sequence", "sequence (one label per text) | token (one label per word)")
    train_file: str = _opt("", "local .csv/.json/.jsonl/.parquet; empty (and no --dataset): the bundled genre task")
    validation_file: str = _opt("", "held-out file (empty: the validation split, else --validation-fraction of train)")
    dataset: str = _opt("", "Hugging Face Hub dataset name, used when --train-file is empty")
    dataset_config: str = _opt("", "configuration name of --dataset")
    text_column: str = _opt("text", "column with the text (token task: the list of words)")
    label_column: str = _opt("label", "column with the label (token task: the list of tags)")
    validation_fraction: float = _opt(0.1, "fraction of train held out when there is no validation data")
    max_train_examples: int = _opt(0, ">0: train on at most this many examples (quick experiments)")
    max_length: int = _opt(128, "tokens per example; longer texts are truncated")
    output_dir: str = _opt("", "output folder (default: runs/finetune-<model name>[-scratch])")
    from_scratch: bool = _opt(False, "re-initialise the weights (same architecture and tokenizer)")
    epochs: int = _opt(3, "passes over the training data")
    max_steps: int = _opt(0, ">0: train exactly this many optimizer steps (overrides --epochs)")
    batch_size: int = _opt(16, "examples per optimizer step (per process)")
    lr: float = _opt(5e-5, "peak learning rate")
    weight_decay: float = _opt(0.01, "decoupled weight decay on matrices")
    warmup_steps: int = _opt(-1, "linear warm-up steps (-1: 6%% of the training steps)")
    eval_every: int = _opt(0, "steps between evaluations (0: at the end of every epoch)")
    patience: int = _opt(3, "stop after this many evaluations without improvement (0: never)")
    metric: str = _opt("accuracy", "accuracy | macro_f1: picks the best checkpoint, drives early stopping")
    seed: int = _opt(0, "seeds the split, the head initialisation, data order and dropout")
    mixed_precision: str = _opt("no", "no | bf16 | fp16")
    overwrite: bool = _opt(False, "replace an output folder written by an earlier finetune")
    resume: bool = _opt(False, "continue the run in the output folder from its last finished epoch")
    progress: bool = _opt(True, "show a progress bar")


# Settings that must match for --resume to continue a run.
RESUME_KEYS = ("model", "task", "train_file", "validation_file", "dataset", "dataset_config", "text_column",
               "label_column", "validation_fraction", "max_train_examples", "max_length", "from_scratch",
               "batch_size", "lr", "weight_decay", "warmup_steps", "seed")


# ----------------------------------------------------------------------------- configuration


def load_finetune_config(recipe: str | None, options: dict[str, Any]) -> FinetuneConfig:
    """Defaults, then the YAML ``recipe`` (keys are the field names), then ``options`` (non-None)."""
    import difflib

    from lmssl.config import _coerce, read_recipe

    cfg = FinetuneConfig()
    names = [f.name for f in dataclasses.fields(cfg)]
    values: dict[str, Any] = {}
    if recipe:
        path = Path(recipe)
        if not path.is_file():
            from lmssl.cli import resolve_recipe

            path = Path(resolve_recipe(recipe))
        data = read_recipe(path, recipe, "settings (model:, epochs:, ...)")
        values.update({str(k).replace("-", "_"): v for k, v in data.items()})
    values.update({k: v for k, v in options.items() if v is not None})
    hints = {f.name: f.type for f in dataclasses.fields(cfg)}
    types = {"str": str, "int": int, "float": float, "bool": bool}
    for key, value in values.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=3)
            raise UserError(f"unknown finetune setting '{key}'" + (f"; did you mean {', '.join(near)}?" if near else
                                                                  f"; valid settings: {', '.join(names)}"))
        setattr(cfg, key, _coerce(key, value, types[hints[key]]))
    _validate(cfg)
    return cfg


def _validate(c: FinetuneConfig) -> None:
    checks = [
        (bool(c.model), "no model given; pass MODEL (an lmssl run directory, an exported folder or a Hub name) or "
                        "set model: in the recipe"),
        (c.task in ("sequence", "token"), f"task must be sequence or token, got '{c.task}'"),
        (c.metric in ("accuracy", "macro_f1"), f"metric must be accuracy or macro_f1, got '{c.metric}'"),
        (0.0 < c.validation_fraction < 1.0, f"validation_fraction must be in (0, 1), got {c.validation_fraction}"),
        (c.max_length >= 2, f"max_length must be at least 2, got {c.max_length}"),
        (c.epochs >= 1 or c.max_steps > 0, f"epochs must be at least 1, got {c.epochs}"),
        (c.batch_size >= 1, f"batch_size must be at least 1, got {c.batch_size}"),
        (c.lr > 0, f"lr must be positive, got {c.lr}"),
        (c.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision must be no, bf16 or fp16, got '{c.mixed_precision}'"),
        (not (c.overwrite and c.resume), "pass either --overwrite (start over) or --resume (continue), not both"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if not c.output_dir:
        name = Path(c.model.rstrip("/")).name or "model"
        c.output_dir = f"runs/finetune-{name}" + ("-scratch" if c.from_scratch else "")


# ----------------------------------------------------------------------------- model source


def model_kind(c: FinetuneConfig) -> str:
    """What MODEL names: "run" (lmssl run directory), "folder" (transformers folder) or "hub"."""
    src = Path(c.model).expanduser()
    if (src / "run.json").is_file():
        return "run"
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise UserError(f"{c.model} is a folder without run.json or config.json; pass an lmssl run directory, a "
                            "folder written by `lmssl export`, or a transformers checkpoint")
        return "folder"
    if src.exists() or c.model.startswith((".", "/", "~")) or c.model.count("/") > 1:
        raise UserError(f"model {c.model} does not exist; pass an lmssl run directory, an exported folder or a Hub name")
    return "hub"


def resolve_model(c: FinetuneConfig, kind: str, out: Path, log) -> tuple[str, str]:
    """``(path or Hub name for from_pretrained, description)``; an lmssl run is exported first
    into ``out/base_model`` (verified against lmssl), or reused from there."""
    if kind == "folder":
        return c.model, f"folder {c.model}"
    if kind == "hub":
        return c.model, f"Hub model {c.model}"
    base = out / "base_model"
    if (base / "config.json").is_file():
        return str(base), f"lmssl run {c.model} (exported earlier to {base})"
    from lmssl.export.core import export_run

    log(f"exporting lmssl run {c.model} to {base}")
    result = export_run(Path(c.model).expanduser(), base, log=lambda msg: log(f"  {msg}"))
    if result.kind == "native":
        shutil.rmtree(base, ignore_errors=True)
        raise UserError(f"{c.model} has no exact transformers equivalent (family '{_family(Path(c.model))}'), and "
                        "fine-tuning goes through transformers; pretrain a gpt2, llama or bert family model")
    return str(base), f"lmssl run {c.model} (exported to {base}, {result.architecture})"


def _family(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "run.json").read_text())["config"]["model"]["family"]
    except (ValueError, KeyError):
        return "?"


# ----------------------------------------------------------------------------- data


def load_task_data(c: FinetuneConfig, log):
    """``DatasetDict`` with ``train`` and ``validation`` splits holding the text and label columns."""
    import datasets

    datasets.disable_progress_bars()
    if c.train_file:
        files = {"train": c.train_file}
        if c.validation_file:
            files["validation"] = c.validation_file
        builders = set()
        for split, f in files.items():
            if not Path(f).is_file():
                raise UserError(f"--{split}-file {f} does not exist")
            suffix = Path(f).suffix.lower()
            if suffix not in FILE_BUILDERS:
                raise UserError(f"cannot read {f}: use a .csv, .tsv, .json, .jsonl or .parquet file")
            builders.add(FILE_BUILDERS[suffix])
        if len(builders) > 1:
            raise UserError("--train-file and --validation-file must be the same kind of file")
        builder = builders.pop()
        kwargs = {"delimiter": "\t"} if Path(c.train_file).suffix.lower() == ".tsv" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, **kwargs)
        except Exception as e:  # pyarrow/json parse errors: one line
            raise UserError(f"could not read {', '.join(files.values())} ({_one_line(e)}); check the file format") from None
        source = ", ".join(files.values())
    elif c.dataset:
        try:
            ds = datasets.load_dataset(c.dataset, c.dataset_config or None)
        except Exception as e:
            raise UserError(f"could not load the dataset {c.dataset!r} ({_one_line(e)}); check the name and network, "
                            "or pass --train-file") from None
        if "train" not in ds:
            raise UserError(f"dataset {c.dataset} has no 'train' split (it has {', '.join(ds)})")
        ds = datasets.DatasetDict({k: ds[k] for k in ("train", "validation") if k in ds})
        source = c.dataset + (f" ({c.dataset_config})" if c.dataset_config else "")
    else:
        if c.validation_file:
            raise UserError("--validation-file needs --train-file (the bundled task has its own validation split)")
        files = {k: str(v) for k, v in BUNDLED_TASK.items()}
        ds = datasets.load_dataset("json", data_files=files)
        source = "the bundled genre task (lmssl/data/corpus/genre_*.jsonl)"
    for split in ds:
        missing = [col for col in (c.text_column, c.label_column) if col not in ds[split].column_names]
        if missing:
            raise UserError(f"the {split} data has no column {missing[0]!r} (columns: {', '.join(ds[split].column_names)}); "
                            f"pass --{'text' if missing[0] == c.text_column else 'label'}-column")
    if c.max_train_examples > 0 and len(ds["train"]) > c.max_train_examples:
        ds["train"] = ds["train"].shuffle(seed=c.seed).select(range(c.max_train_examples))
    if "validation" not in ds:
        split = ds["train"].train_test_split(test_size=c.validation_fraction, seed=c.seed)
        ds = datasets.DatasetDict(train=split["train"], validation=split["test"])
        log(f"held out {len(ds['validation'])} of the training examples for validation (--validation-fraction)")
    return ds, source


def label_names(ds, c: FinetuneConfig) -> list[str]:
    """Label names in id order: the dataset's ClassLabel names, else the sorted distinct values of train."""
    feature = ds["train"].features[c.label_column]
    inner = getattr(feature, "feature", None) if c.task == "token" else feature
    if inner is not None and hasattr(inner, "names"):
        return list(inner.names)
    values = ds["train"][c.label_column]
    if c.task == "token":
        values = [v for row in values for v in row]
    distinct = sorted({v for v in values if v is not None}, key=lambda v: (isinstance(v, str), v))
    if len(distinct) < 2:
        raise UserError(f"the label column {c.label_column!r} has {len(distinct)} distinct value(s); a classifier "
                        "needs at least 2")
    return [str(v) for v in distinct]


def encode(ds, c: FinetuneConfig, tokenizer, names: list[str]):
    """Tokenize and map labels to ids; returns the dataset with input_ids, attention_mask, labels."""
    label2id = {n: i for i, n in enumerate(names)}
    has_names = hasattr(getattr(ds["train"].features[c.label_column], "feature", ds["train"].features[c.label_column]), "names")

    def to_id(v, split):
        if has_names:
            return int(v)
        key = str(v)
        if key not in label2id:
            raise UserError(f"the {split} data has the label {key!r}, which the training data lacks; labels: {', '.join(names)}")
        return label2id[key]

    def fn_sequence(batch, split):
        texts = [t if isinstance(t, str) else "" for t in batch[c.text_column]]
        enc = tokenizer(texts, truncation=True, max_length=c.max_length)
        enc["labels"] = [to_id(v, split) for v in batch[c.label_column]]
        return enc

    def fn_token(batch, split):
        # a space before every word but the first: byte-level and SentencePiece tokenizers
        # then split each word as they would in running text
        words = [[w if i == 0 else " " + w for i, w in enumerate(ws)] for ws in batch[c.text_column]]
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=c.max_length)
        labels = []
        for row, tags in enumerate(batch[c.label_column]):
            previous, ids = None, []
            for w in enc.word_ids(row):
                ids.append(-100 if w is None or w == previous else to_id(tags[w], split))
                previous = w
            labels.append(ids)
        enc["labels"] = labels
        return enc

    fn = fn_sequence if c.task == "sequence" else fn_token
    out = {}
    for split in ds:
        out[split] = ds[split].map(lambda b, s=split: fn(b, s), batched=True, remove_columns=ds[split].column_names,
                                   desc=f"tokenizing {split}")
    import datasets

    return datasets.DatasetDict(out)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------- metrics


def classification_metrics(preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 over the scored positions (label != -100); F1 is averaged over
    the classes that occur in the labels or the predictions."""
    keep = labels != -100
    p, y = preds[keep], labels[keep]
    if len(y) == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    f1 = []
    for k in np.union1d(np.unique(p), np.unique(y)):
        tp = np.sum((p == k) & (y == k))
        wrong = np.sum((p == k) & (y != k)) + np.sum((p != k) & (y == k))
        f1.append(2 * tp / (2 * tp + wrong))
    return {"accuracy": float(np.mean(p == y)), "macro_f1": float(np.mean(f1))}


@torch.no_grad()
def evaluate(model, loader, accelerator) -> dict[str, float]:
    model.eval()
    losses, preds, labels = [], [], []
    for batch in loader:
        out = model(**batch)
        n = batch["labels"].shape[0]
        losses.append(accelerator.gather_for_metrics(out.loss.detach().float().repeat(n)))
        pred, lab = out.logits.argmax(-1), batch["labels"]  # (B,) or, token task, (B, T)
        if pred.dim() > 1:  # token task: one width across processes
            pred = accelerator.pad_across_processes(pred, dim=1, pad_index=-100)
            lab = accelerator.pad_across_processes(lab, dim=1, pad_index=-100)
        pred, lab = accelerator.gather_for_metrics((pred, lab))
        preds.append(pred.cpu().numpy())
        labels.append(lab.cpu().numpy())
    model.train()
    if preds[0].ndim == 2:  # token task: pad rows to one width before concatenating
        width = max(a.shape[1] for a in preds)
        preds = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-100) for a in preds]
        labels = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-100) for a in labels]
    metrics = classification_metrics(np.concatenate(preds).reshape(-1), np.concatenate(labels).reshape(-1))
    metrics["loss"] = float(torch.cat(losses).mean())
    return metrics


class EpochShuffle(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` seeded by ``seed + epoch``: resuming at an epoch replays its order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# ----------------------------------------------------------------------------- saving


def _save_model_folder(model, tokenizer, folder: Path, extra: dict[str, Any]) -> None:
    """``save_pretrained`` model + tokenizer (+ JSON files named by ``extra``) into ``folder``, atomically."""
    from lmssl.data.tokenizer import _save as save_tokenizer
    from lmssl.export.core import move_into_place, quiet_transformers

    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with quiet_transformers():
        model.save_pretrained(str(tmp))
    save_tokenizer(tokenizer, tmp)
    for name, obj in extra.items():
        if isinstance(obj, (bytes, bytearray)):
            (tmp / name).write_bytes(obj)
        elif isinstance(obj, dict) and name.endswith(".json"):
            (tmp / name).write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
        else:
            torch.save(obj, tmp / name)
    move_into_place(tmp, folder)


def _check_output(c: FinetuneConfig, out: Path) -> dict[str, Any] | None:
    """Refuse an occupied output folder (unless --overwrite/--resume); the saved state when resuming."""
    if c.resume:
        state_file = out / "last" / "trainer_state.json"
        if not state_file.is_file():
            raise UserError(f"nothing to resume in {out} (no last/trainer_state.json: no epoch finished yet); "
                            "drop --resume to start")
        state = json.loads(state_file.read_text())
        saved = state.get("config", {})
        changed = [k for k in RESUME_KEYS if k in saved and saved[k] != getattr(c, k)]
        if changed:
            raise UserError(f"--resume: setting '{changed[0]}' differs from the run in {out} "
                            f"({saved[changed[0]]!r} there, {getattr(c, changed[0])!r} now); use the same settings "
                            "or another --output-dir")
        return state
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --output-dir must be a folder")
    if out.is_dir() and any(out.iterdir()):
        if not c.overwrite:
            raise UserError(f"{out} exists and is not empty; pass --resume to continue it, --overwrite to start over, "
                            "or choose another --output-dir")
        if not (out / "finetune.json").is_file():
            raise UserError(f"{out} was not written by `lmssl finetune` (no finetune.json); refusing to delete it "
                            "with --overwrite: choose another --output-dir")
    return None


def _claim_output(c: FinetuneConfig, out: Path) -> None:
    if c.overwrite and out.is_dir():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- training


def finetune(c: FinetuneConfig, log=None) -> dict[str, Any]:
    """Run the fine-tuning described by ``c``; returns the final metrics (best and last)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                              AutoTokenizer, DataCollatorForTokenClassification, DataCollatorWithPadding)

    from lmssl.config import OptimConfig
    from lmssl.export.core import quiet_transformers
    from lmssl.train.checkpoint import atomic_write_text
    from lmssl.train.log import JsonlLog, plot_loss_curve
    from lmssl.train.optim import make_optimizer, make_schedule

    accelerator = Accelerator(mixed_precision=c.mixed_precision)
    is_main = accelerator.is_main_process
    log = log or ((lambda msg: tqdm.write(msg)) if is_main else (lambda msg: None))
    out = Path(c.output_dir)
    # everything that can be checked before anything is written: output folder, model, data
    resume = _check_output(c, out)
    kind = model_kind(c)
    ds, data_source = load_task_data(c, log)
    names = label_names(ds, c)
    if is_main:
        _claim_output(c, out)
        if resume is None:
            atomic_write_text(out / "finetune.json", json.dumps({"config": dataclasses.asdict(c)}, indent=1) + "\n")
    accelerator.wait_for_everyone()

    # model source (an lmssl run is exported first), tokenizer, encoded data
    with accelerator.main_process_first():
        source, described = resolve_model(c, kind, out, log)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer for {c.model} ({_one_line(e)}); check the name or folder") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {c.model} has neither a pad nor an eos token; give it a pad token")
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers: pad with eos
    encoded = encode(ds, c, tokenizer, names)
    if len(encoded["train"]) == 0 or len(encoded["validation"]) == 0:
        raise UserError(f"no {'training' if len(encoded['train']) == 0 else 'validation'} examples in {data_source}")
    collate = (DataCollatorWithPadding(tokenizer) if c.task == "sequence"
               else DataCollatorForTokenClassification(tokenizer))

    # model: pretrained weights or the same architecture from scratch
    auto = AutoModelForSequenceClassification if c.task == "sequence" else AutoModelForTokenClassification
    labels_kw = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                     label2id={n: i for i, n in enumerate(names)}, pad_token_id=tokenizer.pad_token_id)
    set_seed(c.seed)
    load_from = str(out / "last") if resume is not None else source
    try:
        with quiet_transformers():  # "some weights newly initialised": the classification head, expected
            if c.from_scratch and resume is None:
                model = auto.from_config(AutoConfig.from_pretrained(source, **labels_kw))
            else:
                model = auto.from_pretrained(load_from, dtype=torch.float32, **labels_kw)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {c.model} as {auto.__name__} ({_one_line(e)}); is it a transformers model "
                        "with a classification head (GPT-2, Llama, BERT, ...)?") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # GPT-2 style classification finds the last non-pad token

    sampler = EpochShuffle(len(encoded["train"]), c.seed)
    train_loader = DataLoader(encoded["train"], batch_size=c.batch_size, sampler=sampler, collate_fn=collate)
    val_loader = DataLoader(encoded["validation"], batch_size=2 * c.batch_size, collate_fn=collate)
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes)
    total = c.max_steps if c.max_steps > 0 else c.epochs * steps_per_epoch
    warmup = c.warmup_steps if c.warmup_steps >= 0 else int(0.06 * total)
    ocfg = OptimConfig(lr=c.lr, weight_decay=c.weight_decay, beta2=0.999, warmup_steps=warmup, schedule="linear",
                       min_lr_ratio=0.0)
    optimizer = make_optimizer(model, ocfg, accelerator.device.type)
    schedule = make_schedule(optimizer, ocfg, total)
    step, epoch, best, best_step, stale = 0, 0, -1.0, 0, 0
    if resume is not None:
        optimizer.load_state_dict(torch.load(out / "last" / "optimizer.pt", map_location="cpu", weights_only=True))
        schedule.load_state_dict(resume["schedule"])
        step, epoch, best, best_step, stale = (resume[k] for k in ("step", "epoch", "best", "best_step", "stale"))
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)

    if is_main:
        record = {"config": dataclasses.asdict(c), "model_source": described, "data": data_source,
                  "labels": names, "architecture": type(accelerator.unwrap_model(model)).__name__}
        atomic_write_text(out / "finetune.json", json.dumps(record, indent=1) + "\n")
    jsonl = JsonlLog(out / "log.jsonl", step if resume is not None else None, enabled=is_main)
    log(f"finetune: {type(accelerator.unwrap_model(model)).__name__} from {described}"
        f"{' (weights re-initialised: --from-scratch)' if c.from_scratch else ''} | {len(names)} labels | "
        f"{len(encoded['train'])} train / {len(encoded['validation'])} validation examples | {total} steps"
        + (f" | resuming at step {step} (epoch {epoch + 1})" if resume is not None else ""))

    def save_last(early_stopped: bool) -> None:
        state = {"step": step, "epoch": epoch, "best": best, "best_step": best_step, "stale": stale,
                 "schedule": schedule.state_dict(), "early_stopped": early_stopped, "config": dataclasses.asdict(c)}
        if is_main:
            _save_model_folder(accelerator.unwrap_model(model), tokenizer, out / "last",
                               {"optimizer.pt": optimizer.state_dict(), "trainer_state.json": state})
        accelerator.wait_for_everyone()

    def run_eval() -> bool:
        """Evaluate, keep the best model; True when early stopping says stop."""
        nonlocal best, best_step, stale
        ev = evaluate(model, val_loader, accelerator)
        improved = ev[c.metric] > best
        if improved:
            best, best_step, stale = ev[c.metric], step, 0
            if is_main:
                _save_model_folder(accelerator.unwrap_model(model), tokenizer, out / "best",
                                   {"eval_results.json": {"step": step, "epoch": epoch + 1, **ev}})
            accelerator.wait_for_everyone()
        else:
            stale += 1
        jsonl.write({"step": step, "kind": "eval", "epoch": epoch + 1, **{f"eval_{k}": v for k, v in ev.items()}})
        log(f"step {step} (epoch {epoch + 1}): val loss {ev['loss']:.4f}, accuracy {ev['accuracy']:.2%}, "
            f"macro-F1 {ev['macro_f1']:.2%}" + (" (best so far)" if improved else ""))
        if is_main:
            plot_loss_curve(out / "log.jsonl", out / "loss_curve.png", f"finetune: {out.name}")
        return c.patience > 0 and stale >= c.patience

    bar = tqdm(total=total, initial=step, disable=not (is_main and c.progress), desc="finetune", unit="step",
               dynamic_ncols=True)
    early_stopped = bool((resume or {}).get("early_stopped", False))
    window, t0 = [], time.perf_counter()
    model.train()
    while step < total and not early_stopped:
        sampler.set_epoch(epoch)
        done = 0  # batches of this epoch
        for batch in train_loader:
            torch.manual_seed(c.seed * 1_000_003 + step)  # dropout draws depend on the step only
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step, done = step + 1, done + 1
            window.append(loss.detach().float())
            bar.update(1)
            if step % 10 == 0 or step == total:
                mean = float(torch.stack(window).mean())
                jsonl.write({"step": step, "loss": mean, "lr": schedule.get_last_lr()[0], "epoch": epoch + 1,
                             "examples_per_s": len(window) * c.batch_size / max(time.perf_counter() - t0, 1e-9)})
                bar.set_postfix(loss=f"{mean:.3f}")
                window, t0 = [], time.perf_counter()
            epoch_end = done == len(train_loader)
            if (c.eval_every and step % c.eval_every == 0) or step == total or (epoch_end and not c.eval_every):
                early_stopped = run_eval()
            if early_stopped or step >= total:
                break
        if done == len(train_loader):
            epoch += 1
        save_last(early_stopped)  # after every finished epoch, and once at the end
    bar.close()

    best_results = json.loads((out / "best" / "eval_results.json").read_text()) if (out / "best").is_dir() else {}
    result = {"best_step": best_step, f"best_{c.metric}": best, "steps": step,
              "best": {k: best_results.get(k) for k in ("accuracy", "macro_f1", "loss", "step")},
              "best_dir": str(out / "best"), "output_dir": str(out)}
    if is_main:
        atomic_write_text(out / "metrics.json", json.dumps(result, indent=1) + "\n")
    accelerator.end_training()
    log(f"best: accuracy {best_results.get('accuracy', 0):.2%}, macro-F1 {best_results.get('macro_f1', 0):.2%} at "
        f"step {best_step} -> {out / 'best'}")
    return result


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (__doc__ or "").split("\n\n")[0].replace("``", "") + (
        " Settings come from the defaults, then --recipe YAML (keys are the option names with underscores), then "
        "the options given here. Without --train-file/--dataset it fine-tunes on the bundled task (which division "
        "of the Bible a 3-verse passage comes from, 6 classes). Example: lmssl finetune runs/gpt_tiny --epochs 3; "
        "lmssl finetune --recipe recipes/finetune_tiny.yaml [--from-scratch --output-dir runs/gpt_tiny_genre_scratch]")
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="lmssl run directory, exported/transformers folder, or Hub model name")
    parser.add_argument("--recipe", default=None, metavar="YAML", help="YAML file (or shipped recipe name) of settings")
    for f in dataclasses.fields(FinetuneConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f.metadata["help"] + f" (default: {f.default})")
        else:
            typ = {"int": int, "float": float, "str": str}[f.type]
            shown = f" (default: {f.default!r})" if f.default != "" else ""
            parser.add_argument(flag, type=typ, default=None, help=f.metadata["help"] + shown)


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k != "recipe"}
    cfg = load_finetune_config(args.recipe, options)
    result = finetune(cfg)
    print(f"best model: {result['best_dir']}", file=sys.stdout)
    return 0
