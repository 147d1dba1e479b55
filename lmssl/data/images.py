"""Images for vision objectives: local files or a Hugging Face dataset -> normalised batches.

Sources, as for text (:mod:`lmssl.data.text`): ``data.train_files`` (image files, folders
searched recursively, globs; read by ``datasets``' ``imagefolder``) or ``data.dataset``
(a Hub name such as ``uoft-cs/cifar10``, with ``vision.image_column`` naming the image
column). Validation comes from ``data.validation_files`` or ``data.validation_split``,
else every ``round(1 / data.validation_fraction)``-th training image is held out.

Samples are addressed by the global sample cursor (:mod:`lmssl.data.batches`): position
``g`` is image ``order(epoch)[g mod n]`` of a per-epoch permutation seeded by
``(train.seed, epoch)``, and its random crop and flip are drawn from a generator seeded by
``train.seed`` and ``g``. A resumed run therefore sees exactly the images, crops and flips it
would have seen. Training images get MAE's augmentation: a random crop of
``vision.crop_min_scale``-100% of the area with aspect ratio 3/4-4/3, resized to
``vision.image_size``, and a left-right flip half of the time. Held-out images are the
largest centred square, resized. Pixels are scaled to [0, 1], then normalised per channel
by ``vision.mean`` and ``vision.std``.

Decoding and resizing run in the training process (PIL). That keeps up with small images
(CIFAR-sized: well under a millisecond each); large ones want pre-resized copies.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmssl.config import RunConfig, VisionConfig
from lmssl.data.files import resolve_files
from lmssl.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_images(cfg: RunConfig, split: str, labels: bool = False):
    """The ``split`` ('train' or 'validation') images as a ``datasets.Dataset`` with one
    image column, ``image`` (decoded to PIL on access), and with ``labels`` a ``label``
    column too (``vision.label_column``; image folders: the sub-folder names)."""
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
        try:
            ds = datasets.load_dataset("imagefolder", data_files={"data": files}, split="data")
        except Exception as e:  # datasets raises many types for unreadable files
            raise UserError(f"could not read the images in data.train_files ({files[0]}, ...): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        column, label_column = "image", "label"
    elif d.dataset:
        hub_split = d.train_split if split == "train" else (d.validation_split or d.train_split)
        holdout = not d.validation_split
        try:
            ds = datasets.load_dataset(d.dataset, d.dataset_config or None, split=hub_split)
        except Exception as e:
            raise UserError(f"could not load dataset '{d.dataset}' ({d.dataset_config or 'default'}, split "
                            f"'{hub_split}'): {str(e).splitlines()[0] if str(e) else type(e).__name__}; check the "
                            "name and your network, or point data.train_files at local images") from None
        column, label_column = cfg.vision.image_column, cfg.vision.label_column
    else:
        raise UserError(f"the {cfg.objective} objective trains on images: set data.train_files to image files or "
                        "folders, or data.dataset to a Hugging Face image dataset (e.g. data.dataset=uoft-cs/cifar10 "
                        "vision.image_column=img data.validation_split=test)")
    if column not in ds.column_names:
        raise UserError(f"image column '{column}' not found; the data has columns {ds.column_names}: "
                        "set vision.image_column")
    if labels and label_column not in ds.column_names:
        raise UserError(f"no label column '{label_column}' in the images (columns: {ds.column_names}): put the images "
                        "in one sub-folder per class, or set vision.label_column")
    ds = ds.select_columns([column, label_column] if labels else [column])
    if column != "image":
        ds = ds.rename_column(column, "image")
    if labels and label_column != "label":
        ds = ds.rename_column(label_column, "label")
    if holdout:
        every = max(2, round(1 / max(d.validation_fraction, 1e-6)))
        ids = np.arange(len(ds))
        ds = ds.select(ids[ids % every == 0] if split == "validation" else ids[ids % every != 0])
    if split == "train" and d.max_documents > 0:
        ds = ds.select(range(min(d.max_documents, len(ds))))
    if len(ds) == 0:
        raise UserError(f"no {split} images: add images or lower data.validation_fraction")
    return ds


class ImageSamples:
    """Images at global cursor positions -> ``{"pixel_values": (B, C, S, S)}`` float32."""

    def __init__(self, ds, vision: VisionConfig, seed: int, augment: bool) -> None:
        self.ds, self.vision, self.seed, self.augment = ds, vision, seed, augment
        self.n = len(ds)
        self._order_key: tuple[int, int] | None = None
        self._order = np.arange(self.n)
        self._mean = torch.tensor(vision.mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(vision.std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return self.n

    def order(self, epoch: int) -> np.ndarray:
        """Visiting order of epoch ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        if self._order_key != (epoch, self.seed):
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._order_key = (epoch, self.seed)
        return self._order

    def batch_at(self, cursor: int, count: int) -> dict[str, torch.Tensor]:
        """Images at global positions ``cursor .. cursor + count`` (shuffled per epoch when
        augmenting; in dataset order otherwise)."""
        positions = range(cursor, cursor + count)
        ids = [int(self.order(g // self.n)[g % self.n]) if self.augment else g % self.n for g in positions]
        images = self.ds[ids]["image"]
        pixels = np.stack([self.transform(img, g) for img, g in zip(images, positions)])  # (B, S, S[, C]) uint8
        return {"pixel_values": self.normalize(torch.from_numpy(pixels))}

    def transform(self, img, position: int) -> np.ndarray:
        """One PIL image -> ``(S, S, C)`` (or ``(S, S)`` greyscale) uint8, cropped, resized and,
        when augmenting, flipped with draws seeded by ``position``."""
        from PIL import Image

        v = self.vision
        img = img.convert("RGB" if v.channels == 3 else "L")
        S = v.image_size
        if self.augment:
            rng = random.Random((self.seed << 48) + position)  # cheap to seed, unlike numpy's generators
            box = random_crop_box(img.size, v.crop_min_scale, rng)
            flip = v.hflip and rng.random() < 0.5
        else:
            box, flip = center_square(img.size), False
        img = img.resize((S, S), Image.BICUBIC, box=box)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return np.array(img, dtype=np.uint8)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, S, S, C)`` or ``(B, S, S)`` -> float32 ``(B, C, S, S)``, scaled to [0, 1]
        and normalised per channel."""
        x = pixels.float().div_(255.0)
        x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x[:, None]
        return ((x - self._mean) / self._std).contiguous()


def center_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred square of a ``(width, height)`` image, as a PIL box."""
    W, H = size
    side = min(W, H)
    left, top = (W - side) // 2, (H - side) // 2
    return left, top, left + side, top + side


def random_crop_box(size: tuple[int, int], min_scale: float, rng: random.Random,
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A random crop (PIL box) of ``min_scale``-100% of the area, aspect ratio in ``ratio``
    (log-uniform); after 10 draws that do not fit, the centred square."""
    W, H = size
    for _ in range(10):
        area = W * H * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            left, top = rng.randint(0, W - w), rng.randint(0, H - h)
            return left, top, left + w, top + h
    return center_square(size)


@dataclass
class ImageData:
    train: ImageSamples
    eval_batches: list[dict[str, torch.Tensor]]
    train_images: int


def build_image_data(cfg: RunConfig, log=print) -> ImageData:
    """Training samples and the fixed held-out batches (the first ``data.eval_blocks``
    validation images, not augmented)."""
    train_ds = load_images(cfg, "train")
    val = ImageSamples(load_images(cfg, "validation"), cfg.vision, cfg.train.seed, augment=False)
    n = len(val) if cfg.data.eval_blocks <= 0 else min(cfg.data.eval_blocks, len(val))
    mb = cfg.train.micro_batch_size
    eval_batches = [val.batch_at(i, min(mb, n - i)) for i in range(0, n, mb)]
    log(f"images: {len(train_ds):,} for training, {n:,} held out for evaluation")
    return ImageData(ImageSamples(train_ds, cfg.vision, cfg.train.seed, augment=True), eval_batches, len(train_ds))


def labelled_images(cfg: RunConfig, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``limit`` (0: all) images of ``split``, prepared as held-out images are (no
    augmentation), with their labels: ``(pixels (N, C, S, S), labels (N,), class names)``."""
    ds = load_images(cfg, split, labels=True)
    n = len(ds) if limit <= 0 else min(limit, len(ds))
    samples = ImageSamples(ds, cfg.vision, cfg.train.seed, augment=False)
    pixels = torch.cat([samples.batch_at(i, min(256, n - i))["pixel_values"] for i in range(0, n, 256)])
    feature = ds.features["label"]
    names = list(feature.names) if hasattr(feature, "names") else sorted({str(v) for v in ds["label"]})
    raw = ds["label"][:n]
    labels = torch.tensor(raw if hasattr(feature, "names") else [names.index(str(v)) for v in raw])
    return pixels, labels, names
