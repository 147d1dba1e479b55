"""The bundled Fashion-MNIST subset: both splits load through `datasets` with their features,
the training split is class-balanced, and the recorded MEAN/STD are those of its pixels."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
from PIL import Image

from lmssl.data.fashion_mnist import CLASS_NAMES, MEAN, STD, bundled_image_files, features, load_bundled


@pytest.fixture(scope="module")
def splits() -> dict[str, datasets.Dataset]:
    return {split: load_bundled(split) for split in ("train", "validation")}


def test_files_and_features(splits):
    files = bundled_image_files()
    assert set(files) == {"train", "validation"} and all(p.is_file() for p in files.values())
    assert files["validation"].name == "test.parquet"
    for ds in splits.values():
        assert ds.features == features()
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["label"].names == CLASS_NAMES
    assert CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot" and len(CLASS_NAMES) == 10


def test_row_counts_and_balance(splits):
    assert len(splits["train"]) == 20_000 and len(splits["validation"]) == 10_000
    for split, per_class in (("train", 2000), ("validation", 1000)):
        counts = np.bincount(np.asarray(splits[split]["label"][:]), minlength=10)
        assert counts.tolist() == [per_class] * 10, split


def test_images_decode_to_28x28_greyscale(splits):
    for ds in splits.values():
        image = ds[0]["image"]
        assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (28, 28)


def test_mean_std_match_all_training_pixels(splits):
    pixels = np.stack([np.asarray(im) for im in splits["train"]["image"]])  # (20000, 28, 28) uint8
    assert pixels.shape == (20_000, 28, 28)
    scaled = pixels.astype(np.float64) / 255.0
    assert abs(scaled.mean() - MEAN[0]) < 1e-3 and len(MEAN) == 1
    assert abs(scaled.std() - STD[0]) < 1e-3 and len(STD) == 1


def test_unknown_split_is_a_clear_error():
    with pytest.raises(ValueError, match="train"):
        load_bundled("test")
