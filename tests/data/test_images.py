"""Image data for vision objectives: folders of files through `datasets`, held-out split,
normalisation, and augmentation that a resumed run replays exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from lmssl.config import load_config
from lmssl.data.batches import micro_batch
from lmssl.data.images import build_image_data, center_square, random_crop_box
from lmssl.errors import UserError


def write_images(folder, n: int, size: tuple[int, int] = (40, 36), seed: int = 0) -> list:
    """``n`` PNGs: a random colour plus a left-to-right ramp each, in two class folders by
    the ramp's direction (class0 brightens to the right, class1 darkens)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        W, H = size
        base = rng.uniform(40, 215, size=3)
        ramp = np.linspace(-40, 40, W) * rng.uniform(0.3, 1.0) * (1 if i % 2 == 0 else -1)
        pixels = np.clip(base[None, None, :] + ramp[None, :, None], 0, 255).repeat(H, axis=0).astype(np.uint8)
        path = folder / f"class{i % 2}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def image_cfg(folder, *extra):
    return load_config(None, ["objective=mae", "model.preset=vit_tiny", f"data.train_files={folder}",
                              "vision.image_size=16", "vision.patch_size=4", "train.micro_batch_size=4",
                              "data.validation_fraction=0.25", "data.eval_blocks=0", *extra])


def test_folder_split_shapes_and_normalisation(tmp_path):
    write_images(tmp_path / "imgs", 16)
    data = build_image_data(image_cfg(tmp_path / "imgs"), log=lambda m: None)
    assert data.train_images == 12  # every 4th image held out
    assert sum(b["pixel_values"].shape[0] for b in data.eval_batches) == 4
    batch, first = micro_batch(data, image_cfg(tmp_path / "imgs"), 0, 0, 0, 1)
    x = batch["pixel_values"]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and first == 0
    lo, hi = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225  # the normalised range of [0, 1] pixels
    assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5


def test_augmentation_is_a_function_of_the_cursor(tmp_path):
    write_images(tmp_path / "imgs", 10)
    cfg = image_cfg(tmp_path / "imgs")
    a = build_image_data(cfg, log=lambda m: None)
    b = build_image_data(cfg, log=lambda m: None)  # a resumed run rebuilds its data
    x1 = micro_batch(a, cfg, 8, 0, 0, 1)[0]["pixel_values"]
    x2 = micro_batch(b, cfg, 8, 0, 0, 1)[0]["pixel_values"]
    assert torch.equal(x1, x2)
    later_epoch = micro_batch(a, cfg, 8 + 7 * len(a.train), 0, 0, 1)[0]["pixel_values"]
    assert not torch.equal(x1, later_epoch)  # other images, crops and flips in another epoch
    # held-out batches are fixed: centred, not augmented
    assert torch.equal(a.eval_batches[0]["pixel_values"], b.eval_batches[0]["pixel_values"])


def test_greyscale_images(tmp_path):
    write_images(tmp_path / "imgs", 8)
    cfg = image_cfg(tmp_path / "imgs", "vision.channels=1", "vision.mean=[0.5]", "vision.std=[0.25]")
    x = micro_batch(build_image_data(cfg, log=lambda m: None), cfg, 0, 0, 0, 1)[0]["pixel_values"]
    assert x.shape == (4, 1, 16, 16) and -2.0 - 1e-6 <= x.min() and x.max() <= 2.0 + 1e-6


def test_crop_boxes():
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = random_crop_box((40, 30), 0.2, rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert 0.2 * 1200 * 0.9 <= (right - left) * (bottom - top) <= 1200
    assert center_square((40, 30)) == (5, 0, 35, 30)


def test_missing_images_and_columns_are_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="trains on images: set data.train_files"):
        build_image_data(load_config(None, ["objective=mae", "model.preset=vit_tiny"]))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="holds no image files"):
        build_image_data(image_cfg(tmp_path / "empty"))
    write_images(tmp_path / "imgs", 4)
    with pytest.raises(UserError, match="vision.channels must be 1 or 3"):
        image_cfg(tmp_path / "imgs", "vision.channels=2")
    with pytest.raises(UserError, match="one value per channel"):
        image_cfg(tmp_path / "imgs", "vision.channels=1")  # ImageNet's three means left in place
    with pytest.raises(UserError, match="data.streaming=true is for text"):
        build_image_data(image_cfg(tmp_path / "imgs", "data.streaming=true"))
