"""Images for vision objectives: the bundled set, local files or a Hub dataset -> uint8 batches.

Sources, in order of precedence: ``data.train_files`` (image files, folders searched
recursively, globs; read by ``datasets``' ``imagefolder``, labels from the sub-folder
names), ``data.dataset`` (a Hub name such as ``uoft-cs/cifar10``, ``vision.image_column``
and ``vision.label_column`` naming the columns), else the bundled Fashion-MNIST subset
(:mod:`lmssl.data.fashion_mnist`: 20,000 training and the 10,000 test images, 28 x 28
greyscale, 10 classes). Validation comes from ``data.validation_files`` or
``data.validation_split`` (the bundled set: its test split), else every
``round(1 / data.validation_fraction)``-th training image is held out.

The split of work (the DALI-style design): the CPU only decodes each image, converts it
to ``vision.channels`` channels (transparent pixels onto white) and resizes it to a
square of ``vision.load_size`` pixels (the shorter side, then the centred square; 0:
``vision.image_size``), in the training process or in ``data.num_workers`` DataLoader
worker processes. A batch is ``{"images": uint8 (B, C, L, L), "index": (B,) int64 global
sample positions, "labels": (B,) int64 (-1: none), "views": the parameters of every
view}``. The views themselves (crops, flips, colour, blur, ...) are cut on the accelerator
by the objective's :class:`~lmssl.data.views.ViewTransform`, whose parameters are drawn
here, per sample, from a counter keyed by the sample's global position: a sample gets the
same views whatever the number of processes or workers, and after any resume.

Position ``g`` of the run is image ``order(epoch)[g mod n]`` of a per-epoch permutation
seeded by ``(train.seed, epoch)``; held-out images are visited in order, and their views
are drawn at negative positions (``-1 - i``), so they never coincide with a training draw.

Unreadable image files in a folder are skipped (counted and reported in one line); an
image that fails to decode later is replaced by the next readable one, with a warning.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmssl.config import RunConfig, VisionConfig
from lmssl.data.files import load_hub_split, resolve_files
from lmssl.data.order import PositionKeyed
from lmssl.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


# ----------------------------------------------------------------------------- sources


def _readable_images(files: list[str], log) -> list[str]:
    """The files PIL can open and verify; the others are skipped and reported in one line."""
    from PIL import Image

    good, bad = [], []
    for f in files:
        try:
            with Image.open(f) as img:
                img.verify()
            good.append(f)
        except Exception as e:  # PIL raises many types for files that are not images
            bad.append((f, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
    if bad:
        log(f"warning: skipped {len(bad)} unreadable image file(s) of {len(files)} (first: {bad[0][0]}: {bad[0][1]})")
    if not good:
        raise UserError(f"none of the {len(files)} image files could be read (first: {bad[0][0]}: {bad[0][1]}); "
                        "check data.train_files")
    return good


def load_images(cfg: RunConfig, split: str, labels: bool = False, log=lambda msg: None):
    """The ``split`` ('train' or 'validation') images as a ``datasets.Dataset`` with an
    ``image`` column (not decoded: ``{"bytes", "path"}``) and, when the data has labels, a
    ``label`` column. ``labels=True`` makes a missing label column an error."""
    import datasets

    datasets.disable_progress_bars()
    d = cfg.data
    if d.streaming:
        raise UserError("data.streaming=true is for text; image datasets are read with random access (drop it, or "
                        "point data.train_files at a local copy)")
    holdout = False
    if d.train_files:
        if split == "validation" and d.validation_files:
            files = resolve_files(d.validation_files, "data.validation_files", is_image_file, "image")
        else:
            files = resolve_files(d.train_files, "data.train_files", is_image_file, "image")
            holdout = not d.validation_files
        files = _readable_images(files, log)
        try:
            ds = datasets.load_dataset("imagefolder", data_files={"data": files}, split="data")
        except Exception as e:  # datasets raises many types for unreadable files
            raise UserError(f"could not read the images in data.train_files ({files[0]}, ...): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        column, label_column = "image", "label"
    elif d.dataset:
        ds, holdout = load_hub_split(d, split, local_hint="local images")
        column, label_column = cfg.vision.image_column, cfg.vision.label_column
    else:
        from lmssl.data.fashion_mnist import load_bundled

        ds = load_bundled("train" if split == "train" else "validation")
        column, label_column = "image", "label"
    if column not in ds.column_names:
        raise UserError(f"image column '{column}' not found; the data has columns {ds.column_names}: "
                        "set vision.image_column")
    has_labels = label_column in ds.column_names
    if labels and not has_labels:
        raise UserError(f"no label column '{label_column}' in the images (columns: {ds.column_names}): put the images "
                        "in one sub-folder per class, or set vision.label_column")
    ds = ds.select_columns([column, label_column] if has_labels else [column])
    if column != "image":
        ds = ds.rename_column(column, "image")
    if has_labels and label_column != "label":
        ds = ds.rename_column(label_column, "label")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    if holdout:
        every = max(2, round(1 / max(d.validation_fraction, 1e-6)))
        ids = np.arange(len(ds))
        ds = ds.select(ids[ids % every == 0] if split == "validation" else ids[ids % every != 0])
    if split == "train" and d.max_documents > 0:
        ds = ds.select(range(min(d.max_documents, len(ds))))
    if len(ds) == 0:
        raise UserError(f"no {split} images: add images or lower data.validation_fraction")
    return ds


def describe_source(cfg: RunConfig) -> str:
    """One line naming where a run's images come from."""
    if cfg.data.train_files:
        return "images in " + ", ".join(cfg.data.train_files)
    if cfg.data.dataset:
        return cfg.data.dataset
    return "the bundled Fashion-MNIST subset (lmssl/data/fashion_mnist)"


def class_names(ds) -> list[str]:
    """Label names in id order (a ClassLabel's names, else the sorted distinct values); [] without labels."""
    if "label" not in ds.column_names:
        return []
    feature = ds.features["label"]
    if hasattr(feature, "names"):
        return list(feature.names)
    return sorted({str(v) for v in ds["label"]})


# ----------------------------------------------------------------------------- decoding


def decode_image(item: dict, channels: int, size: int) -> np.ndarray:
    """One ``{"bytes", "path"}`` image -> ``(C, size, size)`` uint8: converted to ``channels``
    channels (transparency composited onto white), the shorter side resized to ``size``
    (bicubic), then the centred square."""
    from PIL import Image

    src = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
    with Image.open(src) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img.alpha_composite(rgba)
        img = img.convert("RGB" if channels == 3 else "L")
    W, H = img.size
    if (W, H) != (size, size):
        scale = size / min(W, H)
        w, h = max(size, round(W * scale)), max(size, round(H * scale))
        left, top = (w - size) // 2, (h - size) // 2
        img = img.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size))
    pixels = np.array(img, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, S, S)


class ImageSource(PositionKeyed, torch.utils.data.Dataset):
    """Global sample positions -> decoded batches (see the module docstring).

    A map-style dataset whose keys are positions (``__getitems__`` takes the list of one
    micro-batch), so a DataLoader with :class:`PositionBatches` as its batch sampler
    decodes in worker processes. ``shuffle``: training order (a permutation per epoch);
    else position ``i`` is image ``i`` and views are drawn at ``-1 - i``.
    """

    def __init__(self, ds, vision: VisionConfig, seed: int, shuffle: bool, views=None) -> None:
        self.ds, self.seed, self.shuffle, self.views = ds, seed, shuffle, views
        self.channels = vision.channels
        self.size = vision.load_size or vision.image_size
        self.n = len(ds)
        self.has_labels = "label" in ds.column_names
        feature = ds.features["label"] if self.has_labels else None
        # labels that are not a ClassLabel (strings, raw integers) become ids into their sorted names
        self._label_ids = None if feature is None or hasattr(feature, "names") else \
            {name: i for i, name in enumerate(class_names(ds))}

    def batch_at(self, cursor: int, count: int) -> dict[str, Any]:
        return self.batch(list(range(cursor, cursor + count)))

    def batch(self, positions: list[int]) -> dict[str, Any]:
        ids = self.ids(positions)
        rows = self.ds[ids]
        pixels = np.stack([self._decode(item, i) for item, i in zip(rows["image"], ids)])  # (B, C, L, L)
        if not self.has_labels:
            labels = [-1] * len(ids)
        elif self._label_ids is not None:
            labels = [self._label_ids[str(v)] for v in rows["label"]]
        else:
            labels = [int(v) for v in rows["label"]]
        index = torch.tensor(positions if self.shuffle else [-1 - g for g in positions], dtype=torch.long)
        out: dict[str, Any] = {"images": torch.from_numpy(pixels), "index": index,
                               "labels": torch.tensor(labels, dtype=torch.long)}
        if self.views is not None:
            out["views"] = self.views.draw(index, (self.size, self.size))
        return out

    def _decode(self, item: dict, image_id: int) -> np.ndarray:
        for step in range(min(self.n, 100)):
            j = (image_id + step) % self.n
            try:
                return decode_image(item if step == 0 else self.ds[j]["image"], self.channels, self.size)
            except Exception as e:  # a truncated or corrupt file: use the next image
                where = item.get("path") if step == 0 else self.ds[j]["image"].get("path")
                print(f"lmssl: warning: could not decode image {where or j} ({type(e).__name__}: {e}); "
                      "using the next image instead", file=sys.stderr)
        raise UserError("100 images in a row could not be decoded; check the image files")


class PositionBatches:
    """The global positions of this process's micro-batches from ``cursor`` on, in training
    order (see :mod:`lmssl.data.batches`): micro-step ``a`` of process ``r`` in the step
    starting at ``c`` takes ``[c + (a * world + r) * micro, ... + micro)``."""

    def __init__(self, cursor: int, micro: int, accum: int, rank: int, world: int) -> None:
        self.cursor, self.micro, self.accum, self.rank, self.world = cursor, micro, accum, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        c = self.cursor
        while True:
            for a in range(self.accum):
                start = c + (a * self.world + self.rank) * self.micro
                yield list(range(start, start + self.micro))
            c += self.micro * self.accum * self.world


def _first(batch: dict[str, Any]) -> dict[str, Any]:
    """Collate of a DataLoader whose dataset already returns whole batches."""
    return batch


def usable_workers(asked: int, log) -> int:
    """``data.num_workers``, at most the CPUs this process may use (one line when lowered)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    if asked > cpus:
        log(f"warning: data.num_workers={asked} but this machine lets the process use {cpus} CPU(s); using {cpus}")
        return cpus
    if asked < 0:
        raise UserError(f"data.num_workers must be 0 or more, got {asked}")
    return asked


# ----------------------------------------------------------------------------- the run's data


@dataclass
class ImageData:
    """What the trainer, the monitors and the pictures read (``unit``: what throughput counts)."""

    train: ImageSource
    eval_batches: list[dict[str, Any]]
    train_images: int
    classes: list[str] = field(default_factory=list)  # label names; [] without labels
    bank: tuple[torch.Tensor, torch.Tensor] | None = None  # k-NN bank: uint8 (N, C, L, L) training images, labels
    queries: tuple[torch.Tensor, torch.Tensor] | None = None  # held-out images and labels the monitors score
    num_workers: int = 0
    unit: str = "images"
    units_per_sample: int = 1

    def stream(self, cfg: RunConfig, cursor: int, rank: int, world: int) -> Iterator[tuple[dict[str, Any], int]]:
        """``(micro-batch, first global position)`` for every micro-step from ``cursor`` on."""
        yield from position_stream(self.train, cfg, cursor, rank, world, self.num_workers)


def position_stream(source, cfg: RunConfig, cursor: int, rank: int, world: int,
                    num_workers: int) -> Iterator[tuple[dict[str, Any], int]]:
    """``(micro-batch, first global position)`` for every micro-step from ``cursor`` on, from a
    source with ``batch(positions)`` (whose batches carry their ``index``): read in this
    process, or by ``num_workers`` DataLoader workers fed :class:`PositionBatches`."""
    sampler = PositionBatches(cursor, cfg.train.micro_batch_size, cfg.train.grad_accum, rank, world)
    if num_workers == 0:
        for positions in sampler:
            yield source.batch(positions), positions[0]
        return
    loader = torch.utils.data.DataLoader(source, batch_sampler=sampler, num_workers=num_workers,
                                         collate_fn=_first, persistent_workers=False, prefetch_factor=4)
    for batch in loader:
        yield batch, int(batch["index"][0])


def _labelled(source: ImageSource, count: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first ``count`` images of ``source`` in dataset order, with labels (None without labels)."""
    if count <= 0 or not source.has_labels:
        return None
    n = min(count, source.n)
    chunks = [source.batch(list(range(i, min(i + 256, n)))) for i in range(0, n, 256)]
    return torch.cat([c["images"] for c in chunks]), torch.cat([c["labels"] for c in chunks])


def build_image_data(cfg: RunConfig, log=print, views=None) -> ImageData:
    """Training source, the fixed held-out batches (the first ``data.eval_blocks`` validation
    images, their views drawn as for training but at their own positions) and the monitor
    sets (``monitor.bank_images`` training and ``monitor.query_images`` held-out images,
    labelled). Fills ``vision.num_classes`` from the data when it is 0."""
    train_ds = load_images(cfg, "train", log=log)
    val_ds = load_images(cfg, "validation", log=log)
    classes = class_names(train_ds)
    if not cfg.vision.num_classes and classes:
        cfg.vision.num_classes = len(classes)
    seed = cfg.train.seed
    train = ImageSource(train_ds, cfg.vision, seed, shuffle=True, views=views)
    val = ImageSource(val_ds, cfg.vision, seed, shuffle=False, views=views)
    n = len(val) if cfg.data.eval_blocks <= 0 else min(cfg.data.eval_blocks, len(val))
    mb = cfg.train.micro_batch_size
    eval_batches = [val.batch(list(range(i, min(i + mb, n)))) for i in range(0, n, mb)]
    plain_train = ImageSource(train_ds, cfg.vision, seed, shuffle=False)
    plain_val = ImageSource(val_ds, cfg.vision, seed, shuffle=False)
    bank, queries = _labelled(plain_train, cfg.monitor.bank_images), _labelled(plain_val, cfg.monitor.query_images)
    if not classes:
        log(f"note: the images have no '{cfg.vision.label_column}' labels, so the k-NN and online-probe monitors are off")
    log(f"images: {len(train_ds):,} for training, {n:,} held out for evaluation"
        + (f", {len(classes)} classes" if classes else ""))
    return ImageData(train, eval_batches, len(train_ds), classes, bank, queries,
                     usable_workers(cfg.data.num_workers, log))


def labelled_images(cfg: RunConfig, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``limit`` (0: all) images of ``split`` in dataset order, decoded as for
    training, with their labels: ``(uint8 images (N, C, L, L), labels (N,), class names)``."""
    ds = load_images(cfg, split, labels=True)
    source = ImageSource(ds, cfg.vision, cfg.train.seed, shuffle=False)
    images, labels = _labelled(source, len(ds) if limit <= 0 else limit)
    return images, labels, class_names(ds)
