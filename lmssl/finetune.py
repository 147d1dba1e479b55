"""Fine-tune a pretrained model on a labelled task, always through its ``transformers`` twin.

``lmssl finetune MODEL [options]`` or ``lmssl finetune --recipe recipes/finetune_tiny.yaml``.

MODEL is one of

- an lmssl run directory (it holds ``run.json``): exported first with :mod:`lmssl.export`
  (verified against lmssl) into ``OUTPUT_DIR/base_model``;
- a folder written by ``lmssl export`` or any ``save_pretrained`` checkpoint folder;
- a Hugging Face Hub model name such as ``gpt2`` or ``bert-base-cased`` (needs network).

Text is loaded with ``AutoModelForSequenceClassification`` (``--task sequence``: one label
per text) or ``AutoModelForTokenClassification`` (``--task token``: one label per word;
the text column holds lists of words and the label column lists of tags; only the first
sub-word of each word is scored). An image run (a ViT pretrained by MAE, SimCLR, BYOL,
VICReg, ...) is fine-tuned as ``ViTForImageClassification`` (``--task image``, chosen by
itself for image runs) on the run's own labelled images, or on the image folders
``--train-file`` / ``--validation-file`` name (one sub-folder per class); training images
get a random resized crop and a flip (the run's :class:`~lmssl.data.views.ViewTransform`,
cut on the device), held-out images are only resized and normalised. ``--from-scratch``
builds the same architecture with fresh random weights (same tokenizer, same seed), for
the "does pretraining help?" comparison.

Text data: local ``.csv``/``.json``/``.jsonl``/``.parquet`` files (``--train-file``,
``--validation-file``) read with ``datasets.load_dataset``, or a Hub dataset
(``--dataset NAME [--dataset-config CFG]``, its ``train`` and ``validation`` splits), or,
when neither is given, the bundled task: which division of the Bible a 3-verse passage
comes from (6 classes). String labels are mapped to ids (sorted); ``label2id``/``id2label``
are saved in the model config. Without a validation file or split,
``--validation-fraction`` of the training examples is held out. ``--max-train-examples``
keeps a seeded sample of the training examples and ``--labels-per-class N`` N seeded
examples of every class (the few-label setting: 10 per class).

Training is the pretraining loop itself (:func:`lmssl.train.loop.fit`): the model is
wrapped as an objective (:class:`Classifier`, not a registered pretraining method) and the
labelled examples as its data (:class:`LabelledExamples`), so fine-tuning has the same
per-step seeding, skipping of non-finite steps, atomic checkpoints and exact resume.
AdamW with decay on matrices only and linear warm-up/decay, gradient clipping at 1,
evaluation (loss, accuracy, macro-F1 over the whole validation split) at the end of every
epoch or every ``--eval-every`` steps, early stopping after ``--patience`` evaluations
without improvement of ``--metric``.

Output folder::

    finetune.json        the settings and their fingerprint, the label map, where the model came from
    base_model/          the exported lmssl run (when MODEL was a run directory)
    checkpoints/         the loop's checkpoints (weights, optimizer, schedule, data cursor, best score)
    best/                the best model + tokenizer or image processor (a *For*Classification folder)
                         + eval_results.json
    log.jsonl, loss_curve.png, metrics.json (the best evaluation), final_metrics.json (the last step)

Resume: run the same command again. The run continues from its newest checkpoint (saved at
every evaluation, or every ``--save-every`` steps) exactly as if it had never stopped
(bit-identical on a CPU), and a finished run is left as it is; raise ``--epochs`` or
``--max-steps`` (or ``--patience``) to train it further. ``--resume`` says the same
explicitly (it refuses a folder with nothing to resume). Settings that make it another run
(model, data, labels, lengths, batch size, seed, metric) must match, or the command names
the one that differs; ``--overwrite`` starts over.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from lmssl.config import OptimConfig, TrainConfig
from lmssl.data.order import PositionKeyed
from lmssl.errors import UserError
from lmssl.objectives import Objective, mean_pool
from lmssl.runs.tasks import label_names, load_task_data, one_line as _one_line


def _opt(default: Any, help: str) -> Any:
    """A config field with its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run; a YAML recipe and the command-line options fill it."""

    model: str = _opt("", "lmssl run directory, exported/transformers folder, or Hub model name")
    task: str = _opt("sequence", "sequence (one label per text) | token (one label per word) | image (image runs: "
                                 "chosen by itself)")
    train_file: str = _opt("", "local .csv/.json/.jsonl/.parquet (images: a folder, one sub-folder per class); empty "
                               "(and no --dataset): the bundled genre task, or an image run's own images")
    validation_file: str = _opt("", "held-out file or image folder (empty: the validation split, else "
                                    "--validation-fraction of train)")
    dataset: str = _opt("", "Hugging Face Hub dataset name, used when --train-file is empty (text)")
    dataset_config: str = _opt("", "configuration name of --dataset")
    text_column: str = _opt("text", "column with the text (token task: the list of words)")
    label_column: str = _opt("label", "column with the label (token task: the list of tags)")
    validation_fraction: float = _opt(0.1, "fraction of train held out when there is no validation data")
    max_train_examples: int = _opt(0, ">0: train on a seeded sample of at most this many examples")
    labels_per_class: int = _opt(0, ">0: train on this many seeded examples of every class (few labels: 10)")
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
    save_every: int = _opt(0, "steps between checkpoints (0: at every evaluation)")
    patience: int = _opt(3, "stop after this many evaluations without improvement (0: never)")
    metric: str = _opt("accuracy", "accuracy | macro_f1: picks the best checkpoint, drives early stopping")
    seed: int = _opt(0, "seeds the split, the head initialisation, data order, augmentation and dropout")
    mixed_precision: str = _opt("no", "no | bf16 | fp16")
    max_bad_steps: int = _opt(0, "steps with a non-finite loss or gradient skipped before the run stops (0: stop "
                                 "at the first)")
    overwrite: bool = _opt(False, "start over in an output folder written by an earlier finetune")
    resume: bool = _opt(False, "continue the run in the output folder (what running the same command again does "
                               "anyway); refuses a folder with nothing to resume")
    progress: bool = _opt(True, "show a progress bar")


# Settings that make two fine-tuning runs the same run: a checkpoint of one resumes only the
# same (the others, such as lr, epochs or patience, may change between restarts, as the
# recipe's optimizer settings may in pretraining).
SAME_RUN = ("model", "task", "train_file", "validation_file", "dataset", "dataset_config", "text_column",
            "label_column", "validation_fraction", "max_train_examples", "labels_per_class", "max_length",
            "from_scratch", "batch_size", "metric", "seed")
TASKS = ("sequence", "token", "image")


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
        (c.task in TASKS, f"task must be sequence, token or image, got '{c.task}'"),
        (c.metric in ("accuracy", "macro_f1"), f"metric must be accuracy or macro_f1, got '{c.metric}'"),
        (0.0 < c.validation_fraction < 1.0, f"validation_fraction must be in (0, 1), got {c.validation_fraction}"),
        (c.max_length >= 2, f"max_length must be at least 2, got {c.max_length}"),
        (c.epochs >= 1 or c.max_steps > 0, f"epochs must be at least 1, got {c.epochs}"),
        (c.batch_size >= 1, f"batch_size must be at least 1, got {c.batch_size}"),
        (c.lr > 0, f"lr must be positive, got {c.lr}"),
        (c.labels_per_class >= 0 and c.max_train_examples >= 0 and c.save_every >= 0 and c.eval_every >= 0
         and c.max_bad_steps >= 0, "labels_per_class, max_train_examples, eval_every, save_every and max_bad_steps "
                                   "must be 0 or more"),
        (not (c.labels_per_class and c.task == "token"), "--labels-per-class needs one label per example; the token "
                                                         "task has one per word (use --max-train-examples)"),
        (c.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision must be no, bf16 or fp16, got '{c.mixed_precision}'"),
        (not (c.overwrite and c.resume), "pass either --overwrite (start over) or --resume (continue), not both"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if not c.output_dir:
        name = Path(c.model.rstrip("/")).name or "model"
        c.output_dir = f"runs/finetune-{name}" + ("-scratch" if c.from_scratch else "")


@dataclass
class FinetuneRun:
    """A fine-tuning run as the training loop reads it (:class:`lmssl.train.loop.LoopConfig`):
    the loop's ``train`` and ``optim`` sections made from the settings, and a fingerprint of
    the settings in :data:`SAME_RUN` and the label names."""

    settings: FinetuneConfig
    labels: list[str]
    train: TrainConfig
    optim: OptimConfig
    objective: str = "finetune"

    def to_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "finetune": dataclasses.asdict(self.settings), "labels": self.labels,
                "train": dataclasses.asdict(self.train), "optim": dataclasses.asdict(self.optim)}

    def fingerprint(self) -> str:
        key = {k: getattr(self.settings, k) for k in SAME_RUN} | {"labels": self.labels}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def loop_config(c: FinetuneConfig, labels: list[str], n_train: int, world: int) -> FinetuneRun:
    """The loop's settings: ``--epochs`` (or ``--max-steps``) of ``--batch-size`` examples per
    process, an evaluation per epoch (or every ``--eval-every`` steps) and a checkpoint at each
    one (or every ``--save-every`` steps); AdamW (beta2 0.999), linear warm-up (6% by
    default) and linear decay to 0, gradient clipping at 1."""
    steps_per_epoch = math.ceil(n_train / (c.batch_size * world))
    total = c.max_steps if c.max_steps > 0 else c.epochs * steps_per_epoch
    eval_every = c.eval_every or steps_per_epoch
    train = TrainConfig(output_dir=c.output_dir, max_steps=total, micro_batch_size=c.batch_size, grad_clip=1.0,
                        mixed_precision=c.mixed_precision, seed=c.seed, log_every=min(10, total),
                        eval_every=eval_every, save_every=c.save_every or eval_every, keep_last=2,
                        overwrite=c.overwrite, max_bad_steps=c.max_bad_steps, progress=c.progress)
    optim = OptimConfig(lr=c.lr, weight_decay=c.weight_decay, beta2=0.999, schedule="linear", min_lr_ratio=0.0,
                        warmup_steps=c.warmup_steps if c.warmup_steps >= 0 else int(0.06 * total))
    return FinetuneRun(c, labels, train, optim)


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


def _image_run(c: FinetuneConfig, kind: str):
    """The config of MODEL when it is an image run (None otherwise); sets ``c.task`` to image
    for one, and refuses what cannot be fine-tuned as an image classifier."""
    from lmssl.runs import read_run_config

    run_cfg = read_run_config(Path(c.model).expanduser()) if kind == "run" else None
    if run_cfg is None or run_cfg.modality != "images":
        if c.task == "image":
            raise UserError(f"--task image fine-tunes an lmssl image run (a ViT pretrained by MAE, SimCLR, ...); "
                            f"{c.model} is {'a text run' if run_cfg is not None else 'not an lmssl run'}")
        return None
    if c.task == "token":
        raise UserError(f"{c.model} is an image run; --task token is for text (image runs fine-tune as image classifiers)")
    if run_cfg.model.family != "vit":
        raise UserError(f"{c.model} is a {run_cfg.model.family} image run, and image fine-tuning goes through "
                        "transformers' ViTForImageClassification, which needs a ViT run (model.family=vit); `lmssl "
                        "export` gives this backbone's torchvision weights to fine-tune elsewhere")
    if c.dataset:
        raise UserError("--dataset is for text tasks; an image run fine-tunes on its own images or on the image "
                        "folders --train-file and --validation-file name")
    c.task = "image"
    return run_cfg


# ----------------------------------------------------------------------------- data


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


def few_labels(ds, column: str, per_class: int, seed: int, log):
    """``per_class`` examples of every label value (all of a class that has fewer), drawn
    with ``seed``, kept in dataset order."""
    by_label: dict[str, list[int]] = {}
    for i, v in enumerate(ds[column]):
        by_label.setdefault(str(v), []).append(i)
    rng = np.random.default_rng(seed)
    keep, short = [], []
    for label in sorted(by_label):
        ids = by_label[label]
        if len(ids) < per_class:
            short.append(label)
        keep += rng.choice(ids, size=min(per_class, len(ids)), replace=False).tolist()
    if short:
        log(f"note: {len(short)} class(es) have fewer than {per_class} training examples (first: {short[0]}); all of "
            "theirs are used")
    return ds.select(sorted(keep))


class TokenizedExamples(PositionKeyed):
    """Tokenized labelled examples addressed by global sample position (the visiting order of
    :mod:`lmssl.data.order`, as :class:`~lmssl.data.images.ImageSource` visits images);
    ``batch(positions)`` pads them into one batch."""

    def __init__(self, rows: list[dict[str, Any]], collate, seed: int) -> None:
        self.rows, self.collate, self.seed, self.n, self.shuffle = rows, collate, seed, len(rows), True

    def batch(self, positions: list[int]) -> dict[str, torch.Tensor]:
        return dict(self.collate([self.rows[i] for i in self.ids(positions)]))


class ImageBatches:
    """The held-out images of an :class:`~lmssl.data.images.ImageSource` in dataset order, in
    batches decoded each time they are iterated (a large split is never held in memory)."""

    def __init__(self, source, batch_size: int) -> None:
        self.source, self.batch_size = source, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(0, self.source.n, self.batch_size):
            yield self.source.batch(list(range(i, min(i + self.batch_size, self.source.n))))


@dataclass
class LabelledExamples:
    """Fine-tuning data with the interface of :class:`~lmssl.data.batches.TextData` and
    :class:`~lmssl.data.images.ImageData`: ``train.batch(positions)`` makes a training batch;
    ``validation`` holds the held-out batches, all of which the classifier scores at every
    evaluation (accuracy and macro-F1 need every prediction), so the loop's own
    ``eval_batches`` (averaged batch by batch) stay empty."""

    train: Any  # TokenizedExamples or a shuffling ImageSource
    validation: Any  # iterable of batches, every held-out example once
    n_train: int
    n_validation: int
    eval_batches: list = field(default_factory=list)
    unit: str = "examples"
    units_per_sample: int = 1

    def stream(self, cfg, cursor: int, rank: int, world: int) -> Iterator[tuple[dict[str, Any], int]]:
        """``(micro-batch, first global position)`` for every micro-step from ``cursor`` on."""
        from lmssl.data.images import PositionBatches

        for positions in PositionBatches(cursor, cfg.train.micro_batch_size, cfg.train.grad_accum, rank, world):
            yield self.train.batch(positions), positions[0]


def text_task(c: FinetuneConfig, log):
    """The labelled texts, before tokenizing: ``(DatasetDict, label names, where they came from)``."""
    ds, source = load_task_data(c, log)
    names = label_names(ds, c)
    if c.labels_per_class:
        ds["train"] = few_labels(ds["train"], c.label_column, c.labels_per_class, c.seed, log)
    return ds, names, source


def text_examples(c: FinetuneConfig, ds, names: list[str], source: str, tokenizer) -> tuple[LabelledExamples, float]:
    """The labelled texts encoded: ``(data, mean tokens per training example)``."""
    from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding

    encoded = encode(ds, c, tokenizer, names)
    if len(encoded["train"]) == 0 or len(encoded["validation"]) == 0:
        raise UserError(f"no {'training' if len(encoded['train']) == 0 else 'validation'} examples in {source}")
    collate = (DataCollatorWithPadding(tokenizer) if c.task == "sequence"
               else DataCollatorForTokenClassification(tokenizer))
    train, val = encoded["train"].to_list(), encoded["validation"].to_list()
    size = 2 * c.batch_size
    validation = [dict(collate(val[i:i + size])) for i in range(0, len(val), size)]
    tokens = float(np.mean([len(r["input_ids"]) for r in train]))
    return LabelledExamples(TokenizedExamples(train, collate, c.seed), validation, len(train), len(val)), tokens


def image_examples(c: FinetuneConfig, run_cfg, log) -> tuple[LabelledExamples, list[str], str]:
    """The run's own labelled images (or the folders of ``--train-file``/``--validation-file``),
    decoded as in pretraining; training images carry the parameters of one augmented view
    (random resized crop + flip), drawn per sample from its global position."""
    from lmssl.data.images import ImageSource, class_names, describe_source, load_images
    from lmssl.data.views import ViewTransform, mae_views

    cfg = copy.deepcopy(run_cfg)
    cfg.data.max_documents = 0  # the run's pretraining subset does not limit the labelled set
    if c.train_file:
        cfg.data.train_files, cfg.data.dataset = [c.train_file], ""
        cfg.data.validation_files = [c.validation_file] if c.validation_file else []
        cfg.data.validation_fraction = c.validation_fraction
    elif c.validation_file:
        raise UserError("--validation-file needs --train-file (the run's own images have their own held-out split)")
    train, val = (load_images(cfg, split, labels=True, log=log) for split in ("train", "validation"))
    names = class_names(train)
    train, val = _labels_as(train, names, "training"), _labels_as(val, names, "validation")
    if c.max_train_examples and len(train) > c.max_train_examples:
        train = train.shuffle(seed=c.seed).select(range(c.max_train_examples))
    if c.labels_per_class:
        train = few_labels(train, "label", c.labels_per_class, c.seed, log)
    v = cfg.vision
    views = ViewTransform(mae_views(v.image_size, v.crop_min_scale), v.mean, v.std, c.seed)
    source = ImageSource(train, v, c.seed, shuffle=True, views=views)
    held_out = ImageSource(val, v, c.seed, shuffle=False)
    data = LabelledExamples(source, ImageBatches(held_out, 2 * c.batch_size), len(train), len(val))
    return data, names, describe_source(cfg)


def _labels_as(ds, names: list[str], split: str):
    """``ds`` with its ``label`` column as ids into ``names`` (the training split's class names),
    whatever ids or values the split had (a validation folder may lack a class)."""
    import datasets

    from lmssl.data.images import class_names

    own = class_names(ds)
    feature = ds.features["label"]
    if hasattr(feature, "names") and own == names:
        return ds
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(own) - set(index))
    if unknown:
        raise UserError(f"the {split} images have the label {unknown[0]!r}, which the training images lack; labels: "
                        f"{', '.join(names)}")
    to_id = (lambda v: index[own[v]]) if hasattr(feature, "names") else (lambda v: index[str(v)])
    ds = ds.map(lambda b: {"label": [to_id(v) for v in b]}, input_columns="label", batched=True)
    return ds.cast_column("label", datasets.ClassLabel(names=names))


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


# ----------------------------------------------------------------------------- the objective


class Classifier(Objective):
    """A ``transformers`` classifier (``*ForSequenceClassification``, ``*ForTokenClassification``,
    ``ViTForImageClassification``) as an objective of the training loop. Not registered: the
    registry lists pretraining methods, and fine-tuning builds this itself.

    ``forward(batch) -> (cross-entropy, {"loss", "accuracy"})`` over the scored positions
    (label != -100). Images (``views`` given) arrive as uint8 and are cut into one augmented
    view on the device when training, resized and normalised otherwise. :meth:`eval_metrics`
    scores the whole validation split, keeps the best model as a transformers folder
    (``best_dir``, with ``processor``: the tokenizer or image processor) and counts the
    evaluations without improvement; :meth:`should_stop` ends the run after ``patience``
    of them. The best score and that count are buffers, so checkpoints keep them."""

    name = "finetune"
    description = "supervised fine-tuning of a transformers classifier"
    loss_label = "cross-entropy (nats)"

    def __init__(self, model, processor, best_dir: Path, metric: str, patience: int, tokens_per_example: float,
                 views=None, image_size: int = 0, is_main: bool = True) -> None:
        super().__init__()
        self.model, self.processor, self.best_dir = model, processor, Path(best_dir)
        self.metric, self.patience, self.tokens, self.is_main = metric, patience, tokens_per_example, is_main
        self.views, self.image_size = views, image_size
        self.modality = "images" if views is not None else "text"
        self.register_buffer("best", torch.tensor(float("-inf")))  # best held-out `metric` so far
        self.register_buffer("best_step", torch.tensor(0))
        self.register_buffer("stale", torch.tensor(0))  # evaluations since the best one
        self.steps = 0  # optimizer steps taken (after_step keeps it; a resumed run starts at its step)

    def logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """``(B, classes)``, or ``(B, T, classes)`` for the token task."""
        if self.views is None:
            return self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        if self.training and "views" in batch:
            pixels = self.views.apply(batch["images"], batch["views"])[0]  # (B, C, S, S)
        else:
            pixels = self.views.plain(batch["images"], self.image_size)
        return self.model(pixel_values=pixels).logits

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, labels = self.logits(batch), batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100)
        scored = labels != -100
        accuracy = ((logits.argmax(-1) == labels) & scored).sum() / scored.sum().clamp_min(1)
        return loss, {"loss": loss.detach(), "accuracy": accuracy.float()}

    def features(self, batch: dict[str, Any]) -> torch.Tensor:
        """The base model's representation: a ViT's class token, else the mean over real tokens."""
        if self.views is not None:
            return self.model.base_model(pixel_values=self.views.plain(batch["images"], self.image_size)) \
                .last_hidden_state[:, 0]
        h = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        return mean_pool(h.last_hidden_state, batch.get("attention_mask"))

    def flops_per_sample(self) -> float:
        """About 6 FLOPs per non-embedding parameter and token (forward and backward)."""
        return 6.0 * self.model.num_parameters(exclude_embeddings=True) * self.tokens

    def after_step(self, step: int, skipped: torch.Tensor) -> None:
        self.steps = step + 1

    def should_stop(self) -> bool:
        return self.patience > 0 and int(self.stale) >= self.patience

    @torch.no_grad()
    def eval_metrics(self, ev: dict[str, float], data, log) -> dict[str, float]:
        """Loss, accuracy and macro-F1 over every held-out example; a better ``metric`` than
        before saves the model to ``best_dir``."""
        from lmssl.data.batches import to_device
        from lmssl.models import eval_mode

        device = self.best.device
        loss, preds, labels = torch.zeros((), device=device), [], []
        with eval_mode(self):
            for batch in data.validation:
                batch = to_device(batch, device)
                logits, y = self.logits(batch), batch["labels"].flatten()
                loss += F.cross_entropy(logits.flatten(0, -2).float(), y, ignore_index=-100, reduction="sum")
                preds.append(logits.argmax(-1).flatten().cpu())
                labels.append(y.cpu())
        y = torch.cat(labels).numpy()
        out = classification_metrics(torch.cat(preds).numpy(), y)
        out["loss"] = float(loss) / max(1, int((y != -100).sum()))
        if out[self.metric] > float(self.best):
            self.best.fill_(out[self.metric])
            self.best_step.fill_(self.steps)
            self.stale.zero_()
            if self.is_main:
                self.save_best({"step": self.steps, **out})
            log(f"step {self.steps}: best {self.metric} so far ({out[self.metric]:.2%}) -> {self.best_dir}")
        else:
            self.stale += 1
            if self.should_stop():
                log(f"step {self.steps}: no better {self.metric} in {self.patience} evaluations; stopping early "
                    f"(best {float(self.best):.2%} at step {int(self.best_step)})")
        return out

    def save_best(self, results: dict[str, float]) -> None:
        """``save_pretrained`` model + tokenizer or image processor + ``eval_results.json``, atomically."""
        from lmssl.data.tokenizer import _save as save_tokenizer
        from lmssl.export.core import move_into_place, quiet_transformers

        folder = self.best_dir
        tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with quiet_transformers():
            self.model.save_pretrained(str(tmp))
            if self.views is None:
                save_tokenizer(self.processor, tmp)
            else:
                self.processor.save_pretrained(str(tmp))
        (tmp / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        move_into_place(tmp, folder)


# ----------------------------------------------------------------------------- output folder


def _check_output(c: FinetuneConfig, out: Path) -> None:
    """Refuse a file, a folder `lmssl finetune` did not write, and --resume with nothing there."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --output-dir must be a folder")
    ours = (out / "finetune.json").is_file()
    if c.resume and not ours:
        raise UserError(f"nothing to resume in {out} (no finetune.json); drop --resume to start")
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise UserError(f"{out} exists and was not written by `lmssl finetune` (no finetune.json); "
                        + ("refusing to delete it with --overwrite: " if c.overwrite else "") + "choose another --output-dir")


def _check_same_run(c: FinetuneConfig, out: Path) -> None:
    """Name the setting that makes ``c`` another run than the one in ``out`` (unless --overwrite),
    before anything is exported or read. (The run's fingerprint, which also covers the label
    names, is checked again when the folder is claimed.)"""
    record = out / "finetune.json"
    if c.overwrite or not record.is_file():
        return
    try:
        before = json.loads(record.read_text())["config"]["finetune"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{record} is not the record this lmssl writes; pass --overwrite to start over there, or "
                        "choose another --output-dir") from None
    changed = [k for k in SAME_RUN if before.get(k) != getattr(c, k)]
    if changed:
        k = changed[0]
        raise UserError(f"{out} holds another fine-tuning run (setting '{k}' is {before.get(k)!r} there, "
                        f"{getattr(c, k)!r} now); use the same settings to resume it, --overwrite to start over, or "
                        "another --output-dir")


# ----------------------------------------------------------------------------- fine-tuning


def load_classifier(c: FinetuneConfig, source: str, names: list[str], pad_token_id: int | None):
    """The ``transformers`` classifier of the task from ``source`` (or its architecture with
    fresh weights, ``--from-scratch``), with the label map in its config."""
    import transformers

    from lmssl.export.core import quiet_transformers

    auto = {"sequence": transformers.AutoModelForSequenceClassification,
            "token": transformers.AutoModelForTokenClassification,
            "image": transformers.ViTForImageClassification}[c.task]
    labels_kw = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if pad_token_id is not None:
        labels_kw["pad_token_id"] = pad_token_id
    try:
        with quiet_transformers():  # "some weights newly initialised": the classification head, expected
            if c.from_scratch:
                config = (transformers.ViTConfig if c.task == "image" else transformers.AutoConfig).from_pretrained(
                    source, **labels_kw)
                model = auto(config) if c.task == "image" else auto.from_config(config)
            else:  # (an MAE export's ViTMAE encoder loads into ViTForImageClassification: same names, no decoder)
                model = auto.from_pretrained(source, dtype=torch.float32, **labels_kw)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load {c.model} as {auto.__name__} ({_one_line(e)}); is it a transformers model "
                        "with a classification head (GPT-2, Llama, BERT, ViT, ...)?") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # GPT-2 style classification finds the last non-pad token
    return model.float()


def _tokenizer(c: FinetuneConfig, source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load a tokenizer for {c.model} ({_one_line(e)}); check the name or folder") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of {c.model} has neither a pad nor an eos token; give it a pad token")
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers: pad with eos
    return tokenizer


def finetune(c: FinetuneConfig, log=None) -> dict[str, Any]:
    """Run the fine-tuning described by ``c`` through the training loop; returns the best
    evaluation and where the best model is."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from lmssl.runs import prepare_run_dir
    from lmssl.runs.checkpoint import atomic_write_text
    from lmssl.train.loop import TrainingDiverged, fit, make_accelerator

    out = Path(c.output_dir)
    _check_output(c, out)
    kind = model_kind(c)
    run_cfg = _image_run(c, kind)
    _check_same_run(c, out)
    accelerator = make_accelerator(TrainConfig(output_dir=str(out), mixed_precision=c.mixed_precision))
    is_main = accelerator.is_main_process
    log = log or ((lambda msg: tqdm.write(msg)) if is_main else (lambda msg: None))

    # the labelled data first (bad columns fail before anything is written), then the model
    # source (an lmssl run is exported), then the data as the model reads it
    if c.task == "image":
        data, names, data_source = image_examples(c, run_cfg, log)
    else:
        texts, names, data_source = text_task(c, log)
    with accelerator.main_process_first():
        if is_main and c.overwrite and out.is_dir():
            shutil.rmtree(out)
        source, described = resolve_model(c, kind, out, log)
    if c.task == "image":
        from transformers import AutoImageProcessor

        from lmssl.export.core import quiet_transformers

        with quiet_transformers():  # "torchvision not installed: the PIL backend is used" is fine here
            processor, pad_id = AutoImageProcessor.from_pretrained(source), None
        tokens = 1 + (run_cfg.vision.image_size // run_cfg.vision.patch_size) ** 2
    else:
        processor = _tokenizer(c, source)
        pad_id = processor.pad_token_id
        data, tokens = text_examples(c, texts, names, data_source, processor)
    run = loop_config(c, names, data.n_train, accelerator.num_processes)

    set_seed(c.seed)  # the classification head's initialisation (and the weights, --from-scratch)
    model = load_classifier(c, source, names, pad_id)
    architecture = type(model).__name__
    views, size = (data.train.views, run_cfg.vision.image_size) if c.task == "image" else (None, 0)
    objective = Classifier(model, processor, out / "best", c.metric, c.patience, tokens, views, size, is_main)
    extra = {"model_source": described, "data": data_source, "architecture": architecture}
    with accelerator.main_process_first():
        resume = prepare_run_dir(run, is_main, log, record="finetune.json", extra=extra)
    log(f"finetune: {architecture} from {described}{' (weights re-initialised: --from-scratch)' if c.from_scratch else ''}"
        f" | {len(names)} labels | {data.n_train} train / {data.n_validation} validation examples | "
        f"{run.train.max_steps} steps, evaluated every {run.train.eval_every}")
    try:
        result = fit(objective, data, run, accelerator, resume, None, log)
    except TrainingDiverged as e:  # the loop names its own settings; say which options they are here
        message = str(e)
        for key, option in (("optim.lr", "--lr"), ("optim.warmup_steps", "--warmup-steps"),
                            ("train.max_bad_steps", "--max-bad-steps")):
            message = message.replace(key, option)
        raise TrainingDiverged(message) from None
    if result.get("complete"):
        log(f"{out} is already fine-tuned ({result['step']} steps{', stopped early' if objective.should_stop() else ''}"
            "); raise --epochs or --max-steps (or --patience) to train further")
    if result.get("stopped"):
        return {**result, "output_dir": str(out), "best_dir": str(out / "best")}

    accelerator.wait_for_everyone()
    best_file = out / "best" / "eval_results.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else {}
    metrics = {"best_step": best.get("step", 0), f"best_{c.metric}": best.get(c.metric, 0.0), "steps": result["step"],
               "early_stopped": objective.should_stop(),
               "best": {k: best.get(k) for k in ("accuracy", "macro_f1", "loss", "step")},
               "best_dir": str(out / "best"), "output_dir": str(out)}
    if is_main:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    log(f"best: accuracy {best.get('accuracy', 0):.2%}, macro-F1 {best.get('macro_f1', 0):.2%} at step "
        f"{best.get('step', 0)} -> {out / 'best'}")
    return metrics


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (__doc__ or "").split("\n\n")[0].replace("``", "") + (
        " Settings come from the defaults, then --recipe YAML (keys are the option names with underscores), then "
        "the options given here. Without --train-file/--dataset it fine-tunes a text model on the bundled task "
        "(which division of the Bible a 3-verse passage comes from, 6 classes) and an image run on its own "
        "labelled images. Run the same command again to resume. Examples: lmssl finetune runs/gpt_tiny --epochs 3; "
        "lmssl finetune --recipe recipes/finetune_tiny.yaml [--from-scratch --output-dir runs/gpt_tiny_genre_scratch]; "
        "lmssl finetune runs/mae_tiny --labels-per-class 10")
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
