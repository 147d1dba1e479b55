"""Linear probe of frozen features: how much a pretrained run's representation knows.

``lmssl probe RUN_DIR [--seeds 0 1 2] [--train-file F --validation-file F]``

Works for any run. The run's objective is rebuilt from its latest checkpoint and turned
into a feature extractor. Text runs, ``texts -> (N, dim)`` by :func:`feature_fn`:

- an objective with a ``features(input_ids, attention_mask)`` method (CPC) provides its
  own (for CPC, the mean of the context vectors);
- otherwise the final hidden states of ``objective.backbone`` are averaged over the real
  tokens, read causally for ``clm`` runs and bidirectionally for ``mlm`` runs.

Texts are tokenized as the training data was (no special tokens, the document separator
in front), cut to the run's ``data.block_size`` and padded with an attention mask.

A multinomial logistic regression (one linear layer on standardized features, small
weight decay, Adam on mini-batches) is trained on the task's training split and scored
on its validation split; beside it, a weighted k-NN classifier on the same features
(:mod:`lmssl.evaluate.knn`, 20 neighbours, nothing trained). The same probe runs on the
features of the same network at its initialisation (``objectives.build`` under the run's own seed: the exact weights the run
started from), so the difference is what pretraining added. Each probe seed sets the
probe's initialisation and mini-batch order; the features are fixed.

Data: the bundled genre task (``lmssl/data/corpus/genre_*.jsonl``: which division of the
Bible a 3-verse passage comes from, 6 classes) or local files with ``text`` and ``label``
columns, read by the same loader as ``lmssl finetune``.

Image runs (MAE) are probed on their own data's labels (``vision.label_column``; image
folders: one sub-folder per class), training and validation splits as in pretraining,
images prepared as held-out images are (no augmentation). The feature of an image is the
mean of the encoder's patch states with every patch visible.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmssl.errors import UserError
from lmssl.evaluate import knn_accuracy

CAUSAL = {"clm": True, "mlm": False}  # how a backbone without features() reads its input
KNN_K = 20  # neighbours of the k-NN score printed beside the probe


# ----------------------------------------------------------------------------- data


def load_probe_task(train_file: str | None = None, validation_file: str | None = None, seed: int = 0,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Texts and integer labels of a labelled task: the bundled genre task by default.

    Returns ``{"train": (texts, labels), "validation": (texts, labels), "classes": names,
    "source": description}``; labels are ids into ``classes``.
    """
    from lmssl.finetune import FinetuneConfig, label_names, load_task_data

    c = FinetuneConfig(model="probe", train_file=train_file or "", validation_file=validation_file or "", seed=seed)
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


def feature_fn(objective: nn.Module, objective_name: str) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], str]:
    """``(fn, description)`` with ``fn(input_ids (B, T), attention_mask (B, T)) -> (B, dim)``."""
    if hasattr(objective, "features"):
        what = getattr(objective, "features_description", "")
        return objective.features, f"{type(objective).__name__}.features()" + (f": {what}" if what else "")
    if not hasattr(objective, "backbone"):
        raise UserError(f"the '{objective_name}' objective has neither features() nor a backbone to probe")
    causal = CAUSAL.get(objective_name, objective.backbone.cfg.causal)

    def pooled(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = objective.backbone(ids, mask, is_causal=causal)  # (B, T, dim)
        w = mask.to(h.dtype)[..., None]  # (B, T, 1)
        return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (B, dim)

    return pooled, f"mean-pooled final hidden states of the backbone ({'causal' if causal else 'bidirectional'})"


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ids: list[list[int]], pad_id: int,
                     device: torch.device | str = "cpu", batch_size: int = 64) -> torch.Tensor:
    """``(N, dim)`` float32 CPU features of ``ids``, in order (batched by length, right-padded)."""
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
        feats = fn(x.to(device), mask.to(device)).float().cpu()  # (b, dim)
        for r, i in enumerate(chunk):
            out[i] = feats[r]
    return torch.stack(out)


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
              log: Callable[[str], None] = print, max_images: int = 10000) -> dict[str, Any]:
    """Linear-probe accuracy of a run's frozen features and of the same network at initialisation.

    Returns a dict with ``run`` and ``random`` (validation accuracy per seed, in ``seeds``
    order), ``run_mean``, ``random_mean``, ``majority`` (accuracy of always answering the
    most frequent validation class), ``classes``, ``n_train``, ``n_validation``, ``dim``,
    ``objective``, ``feature``, ``source``, ``seeds`` and ``table`` (the printed summary).
    """
    from lmssl.train.loop import load_run

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("no probe seeds given; pass --seeds 0 1 2 (one or more integers)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    objective, cfg, tokenizer = load_run(run_dir, device)
    if tokenizer is None:
        if train_file or validation_file:
            raise UserError("--train-file/--validation-file are for text runs; an image run is probed on the labels of "
                            "its own data (vision.label_column)")
        return _probe_images(run_dir, objective, cfg, seeds, device, max_images, log)
    task = load_probe_task(train_file, validation_file, log=log)
    max_len = min(cfg.data.block_size, cfg.model.max_positions)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = {s: encode_texts(tokenizer, task[s][0], max_len) for s in ("train", "validation")}
    y = {s: torch.tensor(task[s][1]) for s in ("train", "validation")}

    def features_of(model: nn.Module) -> dict[str, torch.Tensor]:
        model.to(device).eval()
        fn, _ = feature_fn(model, cfg.objective)
        return {s: extract_features(fn, ids[s], pad_id, device) for s in ids}

    _, description = feature_fn(objective, cfg.objective)
    log(f"extracting features of {run_dir} ({cfg.objective}) and of its initialisation on "
        f"{len(ids['train'])} + {len(ids['validation'])} texts")
    run_feats = features_of(objective)
    del objective
    random_feats = features_of(random_init(cfg, tokenizer, cfg.train.seed))
    return _compare(run_dir, cfg.objective, description, task["source"], task["classes"], run_feats, random_feats, y,
                    seeds, "texts")


def _compare(run_dir, objective: str, description: str, source: str, classes: list[str],
             run_feats: dict[str, torch.Tensor], random_feats: dict[str, torch.Tensor], y: dict[str, torch.Tensor],
             seeds: list[int], unit: str) -> dict[str, Any]:
    """The probe on the run's features and on its initialisation's, per seed; the result dict."""
    pairs = (("run", run_feats), ("random", random_feats))
    accs = {name: [train_probe(f["train"], y["train"], f["validation"], y["validation"], seed) for seed in seeds]
            for name, f in pairs}
    knn = {name: knn_accuracy(f["train"], y["train"], f["validation"], y["validation"], k=KNN_K) for name, f in pairs}
    majority = float(torch.bincount(y["validation"]).max()) / len(y["validation"])  # best constant answer
    result: dict[str, Any] = {
        "run_dir": str(run_dir), "objective": objective, "feature": description, "source": source,
        "classes": classes, "n_train": len(y["train"]), "n_validation": len(y["validation"]), "unit": unit,
        "dim": int(run_feats["train"].shape[1]), "seeds": seeds, "run": accs["run"], "random": accs["random"],
        "run_mean": float(np.mean(accs["run"])), "random_mean": float(np.mean(accs["random"])), "majority": majority,
        "knn_k": KNN_K, "knn_run": knn["run"], "knn_random": knn["random"],
    }
    result["table"] = format_table(result)
    return result


def _probe_images(run_dir, objective: nn.Module, cfg, seeds: list[int], device: torch.device, max_images: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    from lmssl.data.images import labelled_images

    data = {s: labelled_images(cfg, s, max_images) for s in ("train", "validation")}
    y = {s: data[s][1] for s in data}
    classes = data["train"][2]

    @torch.no_grad()
    def features_of(model: nn.Module) -> dict[str, torch.Tensor]:
        model.to(device).eval()
        return {s: torch.cat([model.encoder(x.to(device))[:, 1:].mean(dim=1).float().cpu()  # (b, dim)
                              for x in data[s][0].split(256)]) for s in data}

    log(f"extracting features of {run_dir} ({cfg.objective}) and of its initialisation on "
        f"{len(y['train'])} + {len(y['validation'])} images")
    run_feats = features_of(objective)
    random_feats = features_of(random_init(cfg, None, cfg.train.seed))
    source = cfg.data.dataset or "images in " + ", ".join(cfg.data.train_files)
    return _compare(run_dir, cfg.objective, "mean of the encoder's patch states, every patch visible", source,
                    classes, run_feats, random_feats, y, seeds, "images")


def format_table(r: dict[str, Any]) -> str:
    def mean_std(values: list[float]) -> str:
        return f"{np.mean(values):.1%}" + (f" ± {np.std(values):.1%}" if len(values) > 1 else "")

    lines = [f"linear probe of {r['run_dir']} ({r['objective']}): {r['feature']}, dim {r['dim']}",
             f"task: {r['source']}; {len(r['classes'])} classes, {r['n_train']} train / {r['n_validation']} "
             f"validation {r.get('unit', 'texts')}",
             f"  {'seed':<6}{'run features':>16}{'random init':>16}"]
    for seed, a, b in zip(r["seeds"], r["run"], r["random"]):
        lines.append(f"  {seed:<6}{a:>16.1%}{b:>16.1%}")
    lines.append(f"  {'mean':<6}{mean_std(r['run']):>16}{mean_std(r['random']):>16}")
    if "knn_run" in r:
        lines.append(f"  {'k-NN':<6}{r['knn_run']:>16.1%}{r['knn_random']:>16.1%}   (weighted {r['knn_k']}-NN, cosine, "
                     f"no training)")
    lines.append(f"  most frequent class {r['majority']:.1%}, uniform guess {1 / len(r['classes']):.1%}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run's train.output_dir (clm, mlm, cpc or mae)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="probe seeds (default: 0 1 2)")
    parser.add_argument("--train-file", default=None,
                        help="labelled .jsonl/.json/.csv/.parquet with text and label columns (default: the bundled genre task)")
    parser.add_argument("--validation-file", default=None,
                        help="held-out file of the same kind (default: the task's validation split, or 10%% of train)")
    parser.add_argument("--max-images", type=int, default=10000,
                        help="image runs: at most this many images per split (default 10000)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    result = probe_run(args.run_dir, args.seeds, args.train_file, args.validation_file, args.device,
                       max_images=args.max_images)
    print(result["table"])
    return 0
