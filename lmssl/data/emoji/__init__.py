"""Bundled emoji image-caption pairs: the default data of the CPU CLIP recipe.

Every emoji that Debian's ``fonts-noto-color-emoji`` draws (Noto Color Emoji, SIL Open Font
Licence 1.1), 32x32 RGB on white, with its CLDR name and English CLDR keywords as the caption
(Unicode licence; see README.md here). ``train.parquet`` holds the pairs to train on,
``test.parquet`` the held-out emoji for zero-shot classification and retrieval: their names
never occur in a training caption. Both are rebuilt by ``build.py`` in this folder.

Columns: ``image`` (PNG, decoded to RGB), ``caption`` (name, then the keywords the name lacks),
``captions`` (``[caption, name]``), ``name``, ``keywords``, ``emoji`` (the characters),
``codepoints``, ``group`` (a ``ClassLabel`` over :data:`GROUPS`), ``subgroup``, and ``label``: a
``ClassLabel`` whose names are the split's emoji names, one class per emoji, which is what
zero-shot classification reads.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent

# emoji-test.txt's groups, in its order (the Component group holds no fully-qualified emoji)
GROUPS = ["Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places", "Activities",
          "Objects", "Symbols", "Flags"]

# Pixel mean and std of the training images scaled to [0, 1], per channel (R, G, B), as printed
# by build.py. Use them for vision.mean / vision.std.
MEAN = (0.817853, 0.773128, 0.736034)
STD = (0.278793, 0.288566, 0.331741)


def bundled_pair_files() -> dict[str, Path]:
    """``{"train": train.parquet, "validation": test.parquet}``."""
    return {"train": HERE / "train.parquet", "validation": HERE / "test.parquet"}


def features(names: list[str]):
    """The ``datasets.Features`` of a split whose emoji are called ``names`` (in row order)."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(mode="RGB"),
        "caption": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
        "name": datasets.Value("string"),
        "keywords": datasets.List(datasets.Value("string")),
        "emoji": datasets.Value("string"),
        "codepoints": datasets.Value("string"),
        "group": datasets.ClassLabel(names=GROUPS),
        "subgroup": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(names)),
    })


def load_bundled(split: str):
    """The bundled ``split`` ('train' or 'validation') as a ``datasets.Dataset`` with the
    columns above (the features come back from the parquet schema metadata)."""
    import datasets

    files = bundled_pair_files()
    if split not in files:
        raise ValueError(f"no bundled emoji split {split!r}: use one of {sorted(files)}")
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files={split: str(files[split])}, split=split)
    if not hasattr(ds.features["label"], "names"):  # a reader dropped the metadata: the names are in `name`
        ds = ds.cast(features(ds["name"]))
    return ds
