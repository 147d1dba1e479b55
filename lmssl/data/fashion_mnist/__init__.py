"""Bundled Fashion-MNIST subset: the default images of the CPU vision recipes.

Zalando's 28x28 greyscale clothing photos in 10 classes (MIT licence; see README.md here):
``train.parquet`` holds 20,000 training images (2,000 per class), ``test.parquet`` all
10,000 test images, which lmssl uses as its validation split. Both are rebuilt by
``build.py`` in this folder.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# Pixel mean and std of the 20,000 training images scaled to [0, 1], one value per channel
# (greyscale: one), as printed by build.py. Use them for vision.mean / vision.std.
MEAN = (0.286104,)
STD = (0.353251,)


def bundled_image_files() -> dict[str, Path]:
    """``{"train": train.parquet, "validation": test.parquet}``."""
    return {"train": HERE / "train.parquet", "validation": HERE / "test.parquet"}


def features():
    """The ``datasets.Features`` of both files: ``image`` (PNG bytes, decoded to PIL mode
    "L") and ``label`` (a ``ClassLabel`` over :data:`CLASS_NAMES`)."""
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})


def load_bundled(split: str):
    """The bundled ``split`` ('train' or 'validation') as a ``datasets.Dataset`` with
    columns ``image`` and ``label`` and exactly the features of :func:`features`."""
    import datasets

    files = bundled_image_files()
    if split not in files:
        raise ValueError(f"no bundled Fashion-MNIST split {split!r}: use one of {sorted(files)}")
    ds = datasets.load_dataset("parquet", data_files={split: str(files[split])}, split=split)
    # The parquet schema metadata carries the features; cast in case a reader dropped them.
    if ds.features != features():
        ds = ds.cast(features())
    return ds
