"""Image data for vision objectives: the bundled set, folders of files through `datasets`,
held-out split, uint8 batches decoded on the CPU (in worker processes too) with per-sample
view parameters that a resumed run replays exactly, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmssl.config import load_config
from lmssl.data.images import build_image_data, decode_image, load_images
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


def first_batch(data, cfg, cursor=0):
    return next(data.stream(cfg, cursor, 0, 1))


def image_cfg(folder, *extra):
    return load_config(None, ["objective=mae", "model.preset=vit_tiny", f"data.train_files={folder}",
                              "vision.image_size=16", "vision.patch_size=4", "train.micro_batch_size=4",
                              "data.validation_fraction=0.25", "data.eval_blocks=0", *extra])


def quiet(msg):
    pass


def test_folder_split_and_uint8_batches(tmp_path):
    write_images(tmp_path / "imgs", 16)
    cfg = image_cfg(tmp_path / "imgs")
    data = build_image_data(cfg, log=quiet, views=get_views(cfg))
    assert data.train_images == 12 and data.classes == ["class0", "class1"] and cfg.vision.num_classes == 2
    assert sum(b["images"].shape[0] for b in data.eval_batches) == 4
    batch, first = first_batch(data, cfg)
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.uint8 and first == 0
    assert batch["index"].tolist() == [0, 1, 2, 3] and set(batch["labels"].tolist()) <= {0, 1}
    assert "views" in batch and data.eval_batches[0]["index"].tolist() == [-1, -2, -3, -4]
    x = get_views(cfg).apply(batch["images"], batch["views"])[0]
    lo, hi = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225  # the normalised range of [0, 1] pixels
    assert x.shape == (4, 3, 16, 16) and lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5


def get_views(cfg):
    from lmssl.objectives.mae import MAE

    return MAE.make_views(cfg)


def test_samples_are_a_function_of_the_position(tmp_path):
    write_images(tmp_path / "imgs", 10)
    cfg = image_cfg(tmp_path / "imgs")
    a = build_image_data(cfg, log=quiet, views=get_views(cfg))
    b = build_image_data(cfg, log=quiet, views=get_views(cfg))  # a resumed run rebuilds its data
    x1, x2 = first_batch(a, cfg, 8)[0], first_batch(b, cfg, 8)[0]
    assert torch.equal(x1["images"], x2["images"])
    assert all(torch.equal(u, v) for u, v in zip(x1["views"]["views"][0].values(), x2["views"]["views"][0].values()))
    later_epoch = first_batch(a, cfg, 8 + 7 * len(a.train))[0]
    assert not torch.equal(x1["images"], later_epoch["images"])  # other images in another epoch
    # two processes split the same global batch: each position gets the same image and views
    rank1 = next(a.stream(cfg, 8, 1, 2))[0]
    assert torch.equal(rank1["images"], first_batch(a, cfg, 12)[0]["images"])


def test_worker_processes_give_the_same_batches(tmp_path):
    write_images(tmp_path / "imgs", 12)
    cfg = image_cfg(tmp_path / "imgs", "data.num_workers=2")
    data = build_image_data(cfg, log=quiet, views=get_views(cfg))
    assert data.num_workers == 2
    stream = data.stream(cfg, 4, 0, 1)
    with_workers = [next(stream)[0] for _ in range(3)]
    data.num_workers = 0
    stream = data.stream(cfg, 4, 0, 1)
    in_process = [next(stream)[0] for _ in range(3)]
    for w, p in zip(with_workers, in_process):
        assert torch.equal(w["images"], p["images"]) and torch.equal(w["index"], p["index"])


def test_bundled_fashion_mnist_is_the_default():
    cfg = load_config(None, ["objective=mae", "model.preset=vit_tiny", "vision.image_size=28", "vision.patch_size=4",
                             "vision.channels=1", "vision.mean=[0.2861]", "vision.std=[0.3533]",
                             "monitor.bank_images=50", "monitor.query_images=20", "data.eval_blocks=8"])
    data = build_image_data(cfg, log=quiet)
    assert data.train_images == 20000 and len(data.classes) == 10 and cfg.vision.num_classes == 10
    assert data.bank[0].shape == (50, 1, 28, 28) and data.queries[1].shape == (20,)
    assert data.eval_batches[0]["images"].shape[1:] == (1, 28, 28)


def test_greyscale_rgba_palette_and_small_images_are_converted(tmp_path):
    folder = tmp_path / "mixed" / "a"
    folder.mkdir(parents=True)
    Image.new("L", (20, 20), 128).save(folder / "grey.png")
    Image.new("RGBA", (30, 20), (255, 0, 0, 0)).save(folder / "clear.png")  # fully transparent: white
    Image.new("P", (8, 8), 3).save(folder / "palette.png")
    Image.new("RGB", (6, 10), (0, 0, 255)).save(folder / "tiny.jpg")  # smaller than the training size
    for name in ("grey.png", "clear.png", "palette.png", "tiny.jpg"):
        x = decode_image({"path": str(folder / name), "bytes": None}, 3, 16)
        assert x.shape == (3, 16, 16) and x.dtype == np.uint8
    assert (decode_image({"path": str(folder / "clear.png"), "bytes": None}, 3, 16) == 255).all()
    assert decode_image({"path": str(folder / "grey.png"), "bytes": None}, 1, 16).shape == (1, 16, 16)


def test_unreadable_files_are_skipped_counted_and_reported(tmp_path):
    write_images(tmp_path / "imgs", 8)
    (tmp_path / "imgs" / "class0" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "imgs" / "class1" / "cut.png").write_bytes((tmp_path / "imgs" / "class1" / "img001.png").read_bytes()[:40])
    lines = []
    ds = load_images(image_cfg(tmp_path / "imgs"), "train", log=lines.append)
    assert len(ds) == 6  # 8 good images, every 4th held out; the two bad files are gone
    assert len(lines) == 1 and "skipped 2 unreadable image file(s) of 10" in lines[0]


def test_too_many_workers_are_lowered_with_one_line(tmp_path):
    import os

    write_images(tmp_path / "imgs", 8)
    lines = []
    cfg = image_cfg(tmp_path / "imgs", "data.num_workers=999")
    data = build_image_data(cfg, log=lines.append)
    assert data.num_workers == len(os.sched_getaffinity(0))
    assert any("data.num_workers=999" in line and "using" in line for line in lines)


def test_missing_images_and_columns_are_one_clear_error(tmp_path):
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
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (16, 16)).save(flat / "one.png")
    Image.new("RGB", (16, 16)).save(flat / "two.png")
    with pytest.raises(UserError, match="no label column 'label'"):
        load_images(image_cfg(flat, "data.validation_fraction=0.5"), "train", labels=True)
