"""Expand the user's files, folders and globs: the one resolver every command uses."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Callable

from lmssl.errors import UserError

# How `datasets` reads each kind of file; compressed files (.gz, ...) are read by their inner suffix.
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
            ".parquet": "parquet"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def builder_for(path: str | os.PathLike) -> str | None:
    """The ``datasets`` builder that reads ``path`` ("text", "json", "csv", "parquet"), or None."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSION:
        suffixes = suffixes[:-1]
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def resolve_files(patterns: str | os.PathLike | list, key: str = "--files",
                  accept: Callable[[Path], bool] | None = None,
                  kinds: str = ".txt/.json/.jsonl/.csv/.parquet") -> list[str]:
    """Files, folders (searched recursively for readable kinds) and globs -> a sorted list
    without duplicates. ``key`` names the option in error messages; ``accept`` says which
    files a folder contributes (default: those ``datasets`` reads as text data), ``kinds``
    names them in the error for a folder without any."""
    accept = accept or (lambda f: builder_for(f) is not None)
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: dict[str, None] = {}
    for pattern in map(os.fspath, patterns):
        p = Path(pattern).expanduser()
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and accept(f) and not f.name.startswith("."))
            if not found:
                raise UserError(f"{key}: folder '{pattern}' holds no {kinds} files")
        elif p.is_file():
            found = [str(p)]
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
            if not found:
                raise UserError(f"{key}: no files match '{pattern}'; check the path (globs such as data/*.txt are allowed)")
        else:
            raise UserError(f"{key}: data file '{pattern}' does not exist; give a file, a folder or a glob")
        files.update(dict.fromkeys(found))
    if not files:
        raise UserError(f"{key}: no input files given; pass one or more files, folders or globs")
    for f in files:
        if os.path.getsize(f) == 0:
            raise UserError(f"{key}: data file '{f}' is empty; remove it from the list or give it content")
        if not os.access(f, os.R_OK):
            raise UserError(f"{key}: data file '{f}' is not readable; check its permissions")
    return list(files)


def cache_dir() -> Path:
    """Where tokenized corpora and measured CPU peaks are kept (``LMSSL_CACHE``, else ``~/.cache/lmssl``)."""
    return Path(os.environ.get("LMSSL_CACHE", Path.home() / ".cache" / "lmssl"))


def load_hub_split(data, split: str, streaming: bool = False, local_hint: str = "local files"):
    """The ``split`` ('train' or 'validation') of the Hub dataset ``data.dataset`` (a
    :class:`~lmssl.config.DataConfig`) and whether validation must be held out of training
    (no ``data.validation_split``: the validation split is the training split). A load that
    fails is one :class:`UserError` line naming the dataset, its split and ``local_hint``."""
    import datasets

    hub_split = data.train_split if split == "train" else (data.validation_split or data.train_split)
    try:
        ds = datasets.load_dataset(data.dataset, data.dataset_config or None, split=hub_split, streaming=streaming)
    except Exception as e:  # datasets raises many types (network, missing config, bad name)
        raise UserError(f"could not load dataset '{data.dataset}' ({data.dataset_config or 'default'}, split "
                        f"'{hub_split}'): {str(e).splitlines()[0] if str(e) else type(e).__name__}; check the "
                        f"name and your network, or point data.train_files at {local_hint}") from None
    return ds, not data.validation_split
