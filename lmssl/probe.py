"""Linear probe of frozen features: how much a pretrained run's representation knows.

``lmssl probe RUN_DIR [--seeds 0 1 2] [--train-file F --validation-file F]``

Works for any run: the run's objective is rebuilt from its latest checkpoint, and its
``features(batch) -> (B, D)`` (the objective contract, :mod:`lmssl.objectives`) is what is
probed: mean-pooled final hidden states for GPT (read causally) and BERT, CPC's context
vectors, an image method's pooled backbone on unaugmented images.

Text runs are probed on the bundled genre task (``lmssl/data/corpus/genre_*.jsonl``: which
division of the Bible a 3-verse passage comes from, 6 classes) or local files with
``text`` and ``label`` columns (:mod:`lmssl.runs.tasks`). Texts are tokenized as the
training data was (no special tokens, the document separator in front), cut to the run's
``data.block_size`` and padded with an attention mask.

Image runs are probed on their own data's labels (``vision.label_column``; image folders:
one sub-folder per class; the bundled Fashion-MNIST: its 10 classes), the training split
against the held-out split (at most ``--max-images`` each), and on two more rows: the raw
pixels (the honest floor: on Fashion-MNIST a linear classifier of pixels gets about 84%
and a k-NN about 85%) and a few-label setting (``--few-labels`` per class, 10 by default,
drawn from the training split per seed), where pretraining should matter most.

A multinomial logistic regression (one linear layer on standardized features, small
weight decay, Adam on mini-batches) is trained on the training split and scored on the
validation split; beside it, a weighted k-NN classifier on the same features
(:mod:`lmssl.evaluate.knn`, 20 neighbours, nothing trained). The same probe runs on the
features of the same network at its initialisation (``objectives.build`` under the run's
own seed: the exact weights the run started from), so the difference is what pretraining
added. Each probe seed sets the probe's initialisation and mini-batch order; the
features are fixed.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmssl.errors import UserError
from lmssl.evaluate import knn_accuracy

KNN_K = 20  # neighbours of the k-NN score printed beside the probe


# ----------------------------------------------------------------------------- data


def load_probe_task(train_file: str | None = None, validation_file: str | None = None, seed: int = 0,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Texts and integer labels of a labelled task: the bundled genre task by default.

    Returns ``{"train": (texts, labels), "validation": (texts, labels), "classes": names,
    "source": description}``; labels are ids into ``classes``.
    """
    from lmssl.runs.tasks import TaskSpec, label_names, load_task_data

    c = TaskSpec(train_file=train_file or "", validation_file=validation_file or "", seed=seed)
    ds, source = load_task_data(c, log)
    names = label_names(ds, c)
    index = {n: i for i, n in enumerate(names)}
    out: dict[str, Any] = {"classes": names, "source": source}
    for split in ("train", "validation"):
        texts = [t if isinstance(t, str) else "" for t in ds[split][c.text_column]]
        labels = []
        for v in ds[split][c.label_column]:
            key = str(v)
            if key not in index:
                raise UserError(f"the {split} data has the label {key!r}, which the training data lacks; "
                                f"labels: {', '.join(names)}")
            labels.append(index[key])
        out[split] = (texts, labels)
    return out


def encode_texts(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Token ids as in training (no special tokens, document separator first), at most ``max_len``."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    prefix = [sep] if sep is not None else []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [(prefix + row)[:max_len] or prefix for row in ids]


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def extract_features(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], ids: list[list[int]], pad_id: int,
                     device: torch.device | str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """``(N, dim)`` float32 CPU features ``fn({"input_ids", "attention_mask"})`` of ``ids``, in
    order (batched by length, right-padded)."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        T = max(len(ids[i]) for i in chunk)
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for r, i in enumerate(chunk):
            x[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        feats = fn({"input_ids": x.to(device), "attention_mask": mask.to(device)}).float().cpu()  # (b, dim)
        for r, i in enumerate(chunk):
            out[i] = feats[r]
    return torch.stack(out)


@torch.no_grad()
def image_features(objective: nn.Module, images: torch.Tensor, device: torch.device | str = "cpu",
                   batch_size: int = 256) -> torch.Tensor:
    """``(N, D)`` float32 CPU features of uint8 ``images (N, C, L, L)`` (``objective.features``)."""
    return torch.cat([objective.features({"images": x.to(device)}).float().cpu() for x in images.split(batch_size)])


def raw_pixels(objective: nn.Module, images: torch.Tensor, side: int = 32) -> torch.Tensor:
    """The floor every image representation must beat: normalised pixels ``(N, C * S * S)``,
    average-pooled to at most ``side x side`` (a 224-pixel image would give 150k dimensions)."""
    x = torch.cat([objective.plain_images({"images": chunk}).float() for chunk in images.split(1024)])
    if x.shape[-1] > side:
        x = F.adaptive_avg_pool2d(x, side)
    return x.flatten(1)


def describe_features(objective: nn.Module) -> str:
    """What ``features`` computes: the first line of its docstring."""
    doc = getattr(objective, "features_description", "") or (type(objective).features.__doc__ or "")
    if not doc and hasattr(objective, "embed"):
        doc = type(objective).embed.__doc__ or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return f"{type(objective).__name__}.features()" + (f": {first}" if first else "")


# ----------------------------------------------------------------------------- the probe


def train_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, seed: int,
                steps: int = 500, batch_size: int = 256, lr: float = 1e-2, weight_decay: float = 1e-3) -> float:
    """Validation accuracy of a logistic-regression probe ``(N, dim) -> classes``.

    Features are standardized with the training split's mean and std; the probe is one
    linear layer trained with AdamW (decay on the weight matrix only, cosine learning rate)
    and cross-entropy for a fixed number of steps on mini-batches; ``seed`` sets the
    initialisation and the order of the mini-batches.
    """
    if not torch.isfinite(x_train).all() or not torch.isfinite(x_val).all():
        raise UserError("the features hold NaN or inf values; the run's weights may have diverged")
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-6)
    xt, xv = (x_train - mean) / std, (x_val - mean) / std
    n_classes = int(max(int(y_train.max()), int(y_val.max())) + 1)
    g = torch.Generator().manual_seed(seed)
    probe = nn.Linear(xt.shape[1], n_classes)
    with torch.no_grad():
        probe.weight.normal_(0.0, 0.01, generator=g)
        probe.bias.zero_()
    opt = torch.optim.AdamW([{"params": [probe.weight], "weight_decay": weight_decay},
                             {"params": [probe.bias], "weight_decay": 0.0}], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    batch_size = min(batch_size, len(xt))
    perm, cursor = torch.randperm(len(xt), generator=g), 0
    for _ in range(steps):
        if cursor + batch_size > len(perm):  # next pass over the data, in a new order
            perm, cursor = torch.randperm(len(xt), generator=g), 0
        idx = perm[cursor:cursor + batch_size]
        cursor += batch_size
        loss = F.cross_entropy(probe(xt[idx]), y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float((probe(xv).argmax(dim=1) == y_val).float().mean())


def random_init(cfg, tokenizer, seed: int) -> nn.Module:
    """The run's network at initialisation: ``objectives.build`` under ``seed``, global RNG untouched."""
    from lmssl import objectives

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return objectives.build(cfg, tokenizer)


def probe_run(run_dir: str, seeds: list[int] | tuple[int, ...] = (0, 1, 2), train_file: str | None = None,
              validation_file: str | None = None, device: str | torch.device | None = None,
              log: Callable[[str], None] = print, max_images: int = 10000, few_labels: int = 10) -> dict[str, Any]:
    """Linear-probe and k-NN accuracy of a run's frozen features and of the same network at
    initialisation (and, for image runs, of raw pixels and with ``few_labels`` per class).

    Returns a dict with ``rows`` (name -> {"linear": per-seed accuracies, "knn": accuracy},
    and ``few`` the same for the few-label setting), the legacy keys ``run``, ``random``,
    ``run_mean``, ``random_mean``, ``knn_run``, ``knn_random``, and ``majority``,
    ``classes``, ``n_train``, ``n_validation``, ``dim``, ``objective``, ``feature``,
    ``source``, ``seeds``, ``unit`` and ``table`` (the printed summary).
    """
    from lmssl.runs import load_run

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("no probe seeds given; pass --seeds 0 1 2 (one or more integers)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    objective, cfg, tokenizer = load_run(run_dir, device)
    description = describe_features(objective)
    if cfg.modality == "images":
        if train_file or validation_file:
            raise UserError("--train-file/--validation-file are for text runs; an image run is probed on the labels of "
                            "its own data (vision.label_column)")
        return _with_step(run_dir, _probe_images(run_dir, objective, cfg, seeds, device, max_images, few_labels,
                                                 description, log))
    task = load_probe_task(train_file, validation_file, log=log)
    max_len = min(cfg.data.block_size, cfg.model.max_positions)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = {s: encode_texts(tokenizer, task[s][0], max_len) for s in ("train", "validation")}
    y = {s: torch.tensor(task[s][1]) for s in ("train", "validation")}

    def features_of(model: nn.Module) -> dict[str, torch.Tensor]:
        model.to(device).eval()
        return {s: extract_features(model.features, ids[s], pad_id, device) for s in ids}

    log(f"extracting features of {run_dir} ({cfg.objective}) and of its initialisation on "
        f"{len(ids['train'])} + {len(ids['validation'])} texts")
    feats = {"run features": features_of(objective)}
    del objective
    feats["random init"] = features_of(random_init(cfg, tokenizer, cfg.train.seed))
    return _with_step(run_dir, _compare(run_dir, cfg.objective, description, task["source"], task["classes"], feats,
                                        y, seeds, "texts"))


def _with_step(run_dir, result: dict[str, Any]) -> dict[str, Any]:
    """The result with the step of the checkpoint that was probed."""
    from lmssl.runs.checkpoint import find_resumable

    c = find_resumable(Path(run_dir), log=lambda msg: None)
    result["step"] = c.step if c is not None else None
    return result


def _few_label_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` examples of every class of ``y`` (fewer where a class has
    fewer), drawn with ``seed``."""
    g = torch.Generator().manual_seed(10_000 + seed)
    picks = []
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        picks.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(picks).sort().values


def _compare(run_dir, objective: str, description: str, source: str, classes: list[str],
             feats: dict[str, dict[str, torch.Tensor]], y: dict[str, torch.Tensor], seeds: list[int], unit: str,
             few_labels: int = 0) -> dict[str, Any]:
    """The probe and k-NN on every named feature set (``"run features"`` first), per seed,
    and with ``few_labels`` training examples per class when > 0; the result dict."""
    def scores(f: dict[str, torch.Tensor], keep: torch.Tensor | None, seed: int) -> tuple[float, float]:
        xt, yt = (f["train"], y["train"]) if keep is None else (f["train"][keep], y["train"][keep])
        linear = train_probe(xt, yt, f["validation"], y["validation"], seed)
        knn = knn_accuracy(xt, yt, f["validation"], y["validation"], k=min(KNN_K, len(yt)))
        return linear, knn

    rows, few = {}, {}
    for name, f in feats.items():
        full = [scores(f, None, seed) for seed in seeds]
        rows[name] = {"linear": [a for a, _ in full], "knn": full[0][1]}  # k-NN on all labels has no seed
        if few_labels > 0:
            sub = [scores(f, _few_label_subset(y["train"], few_labels, seed), seed) for seed in seeds]
            few[name] = {"linear": [a for a, _ in sub], "knn": [k for _, k in sub]}
    majority = float(torch.bincount(y["validation"]).max()) / len(y["validation"])  # best constant answer
    run, rand = rows["run features"], rows["random init"]
    result: dict[str, Any] = {
        "run_dir": str(run_dir), "objective": objective, "feature": description, "source": source,
        "classes": classes, "n_train": len(y["train"]), "n_validation": len(y["validation"]), "unit": unit,
        "dim": int(feats["run features"]["train"].shape[1]), "seeds": seeds, "rows": rows, "few": few,
        "few_labels": few_labels, "run": run["linear"], "random": rand["linear"],
        "run_mean": float(np.mean(run["linear"])), "random_mean": float(np.mean(rand["linear"])),
        "majority": majority, "knn_k": KNN_K, "knn_run": run["knn"], "knn_random": rand["knn"],
    }
    result["table"] = format_table(result)
    return result


def _probe_images(run_dir, objective: nn.Module, cfg, seeds: list[int], device: torch.device, max_images: int,
                  few_labels: int, description: str, log: Callable[[str], None]) -> dict[str, Any]:
    from lmssl.data.images import labelled_images

    data = {s: labelled_images(cfg, s, max_images) for s in ("train", "validation")}
    y = {s: data[s][1] for s in data}
    classes = data["train"][2]
    log(f"extracting features of {run_dir} ({cfg.objective}), of its initialisation and of raw pixels on "
        f"{len(y['train'])} + {len(y['validation'])} images")

    def features_of(model: nn.Module) -> dict[str, torch.Tensor]:
        model.to(device).eval()
        return {s: image_features(model, data[s][0], device) for s in data}

    feats = {"run features": features_of(objective),
             "random init": features_of(random_init(cfg, None, cfg.train.seed)),
             "raw pixels": {s: raw_pixels(objective, data[s][0]) for s in data}}
    from lmssl.data.images import describe_source

    return _compare(run_dir, cfg.objective, description, describe_source(cfg), classes, feats, y, seeds, "images",
                    few_labels)


def format_table(r: dict[str, Any]) -> str:
    def mean_std(values: list[float]) -> str:
        return f"{np.mean(values):.1%}" + (f" ± {np.std(values):.1%}" if len(values) > 1 else "")

    names = list(r["rows"])
    lines = [f"linear probe of {r['run_dir']} ({r['objective']}): {r['feature']}, dim {r['dim']}",
             f"task: {r['source']}; {len(r['classes'])} classes, {r['n_train']} train / {r['n_validation']} "
             f"validation {r.get('unit', 'texts')}",
             f"  {'seed':<6}" + "".join(f"{n:>16}" for n in names)]
    for i, seed in enumerate(r["seeds"]):
        lines.append(f"  {seed:<6}" + "".join(f"{r['rows'][n]['linear'][i]:>16.1%}" for n in names))
    lines.append(f"  {'mean':<6}" + "".join(f"{mean_std(r['rows'][n]['linear']):>16}" for n in names))
    lines.append(f"  {'k-NN':<6}" + "".join(f"{r['rows'][n]['knn']:>16.1%}" for n in names)
                 + f"   (weighted {r['knn_k']}-NN, cosine, no training)")
    if r.get("few"):
        lines.append(f"  with {r['few_labels']} labelled {r.get('unit', 'texts')} per class (a new draw per seed):")
        lines.append(f"  {'linear':<6}" + "".join(f"{mean_std(r['few'][n]['linear']):>16}" for n in names))
        lines.append(f"  {'k-NN':<6}" + "".join(f"{mean_std(r['few'][n]['knn']):>16}" for n in names))
    lines.append(f"  most frequent class {r['majority']:.1%}, uniform guess {1 / len(r['classes']):.1%}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run's train.output_dir (any objective)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="probe seeds (default: 0 1 2)")
    parser.add_argument("--train-file", default=None,
                        help="labelled .jsonl/.json/.csv/.parquet with text and label columns (default: the bundled genre task)")
    parser.add_argument("--validation-file", default=None,
                        help="held-out file of the same kind (default: the task's validation split, or 10%% of train)")
    parser.add_argument("--max-images", type=int, default=10000,
                        help="image runs: at most this many images per split (default 10000)")
    parser.add_argument("--few-labels", type=int, default=10,
                        help="image runs: also probe with this many labelled images per class (0: off; default 10)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    result = probe_run(args.run_dir, args.seeds, args.train_file, args.validation_file, args.device,
                       max_images=args.max_images, few_labels=args.few_labels)
    print(result["table"])
    save_result(result)
    return 0


def save_result(result: dict[str, Any]) -> Path:
    """``RUN_DIR/probe.json``: the result, read by ``lmssl export`` for the model card."""
    import json

    from lmssl.runs.checkpoint import atomic_write_text

    path = Path(result["run_dir"]) / "probe.json"
    atomic_write_text(path, json.dumps(result, indent=1))
    return path
