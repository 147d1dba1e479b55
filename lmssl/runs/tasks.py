"""Labelled tasks: the texts and labels that ``lmssl finetune`` and ``lmssl probe`` read.

The bundled task (which division of the Bible a 3-verse passage comes from, 6 classes,
``lmssl/data/corpus/genre_*.jsonl``), local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet``
files, or a Hub dataset, all through ``datasets``. ``c`` is any object with the fields of
:class:`TaskSpec` (``lmssl.finetune.FinetuneConfig`` is one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmssl.errors import UserError

CORPUS_DIR = Path(__file__).resolve().parents[1] / "data" / "corpus"
BUNDLED_TASK = {"train": CORPUS_DIR / "genre_train.jsonl", "validation": CORPUS_DIR / "genre_validation.jsonl"}
FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskSpec:
    """Where a labelled task comes from and how it is read."""

    train_file: str = ""  # local file; empty (and no dataset): the bundled genre task
    validation_file: str = ""  # held-out file (empty: the validation split, else validation_fraction of train)
    dataset: str = ""  # Hub dataset name, used when train_file is empty
    dataset_config: str = ""
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = 0.1
    max_train_examples: int = 0
    seed: int = 0
    task: str = "sequence"  # sequence | token


def load_task_data(c, log=print):
    """``DatasetDict`` with ``train`` and ``validation`` splits holding the text and label columns."""
    import datasets

    datasets.disable_progress_bars()
    if c.train_file:
        files = {"train": c.train_file}
        if c.validation_file:
            files["validation"] = c.validation_file
        builders = set()
        for split, f in files.items():
            if not Path(f).is_file():
                raise UserError(f"--{split}-file {f} does not exist")
            suffix = Path(f).suffix.lower()
            if suffix not in FILE_BUILDERS:
                raise UserError(f"cannot read {f}: use a .csv, .tsv, .json, .jsonl or .parquet file")
            builders.add(FILE_BUILDERS[suffix])
        if len(builders) > 1:
            raise UserError("--train-file and --validation-file must be the same kind of file")
        builder = builders.pop()
        kwargs = {"delimiter": "\t"} if Path(c.train_file).suffix.lower() == ".tsv" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=files, **kwargs)
        except Exception as e:  # pyarrow/json parse errors: one line
            raise UserError(f"could not read {', '.join(files.values())} ({one_line(e)}); check the file format") from None
        source = ", ".join(files.values())
    elif c.dataset:
        try:
            ds = datasets.load_dataset(c.dataset, c.dataset_config or None)
        except Exception as e:
            raise UserError(f"could not load the dataset {c.dataset!r} ({one_line(e)}); check the name and network, "
                            "or pass --train-file") from None
        if "train" not in ds:
            raise UserError(f"dataset {c.dataset} has no 'train' split (it has {', '.join(ds)})")
        ds = datasets.DatasetDict({k: ds[k] for k in ("train", "validation") if k in ds})
        source = c.dataset + (f" ({c.dataset_config})" if c.dataset_config else "")
    else:
        if c.validation_file:
            raise UserError("--validation-file needs --train-file (the bundled task has its own validation split)")
        files = {k: str(v) for k, v in BUNDLED_TASK.items()}
        ds = datasets.load_dataset("json", data_files=files)
        source = "the bundled genre task (lmssl/data/corpus/genre_*.jsonl)"
    for split in ds:
        missing = [col for col in (c.text_column, c.label_column) if col not in ds[split].column_names]
        if missing:
            raise UserError(f"the {split} data has no column {missing[0]!r} (columns: {', '.join(ds[split].column_names)}); "
                            f"pass --{'text' if missing[0] == c.text_column else 'label'}-column")
    if c.max_train_examples > 0 and len(ds["train"]) > c.max_train_examples:
        ds["train"] = ds["train"].shuffle(seed=c.seed).select(range(c.max_train_examples))
    if "validation" not in ds:
        split = ds["train"].train_test_split(test_size=c.validation_fraction, seed=c.seed)
        ds = datasets.DatasetDict(train=split["train"], validation=split["test"])
        log(f"held out {len(ds['validation'])} of the training examples for validation (--validation-fraction)")
    return ds, source


def label_names(ds, c) -> list[str]:
    """Label names in id order: the dataset's ClassLabel names, else the sorted distinct values of train."""
    feature = ds["train"].features[c.label_column]
    inner = getattr(feature, "feature", None) if c.task == "token" else feature
    if inner is not None and hasattr(inner, "names"):
        return list(inner.names)
    values = ds["train"][c.label_column]
    if c.task == "token":
        values = [v for row in values for v in row]
    distinct = sorted({v for v in values if v is not None}, key=lambda v: (isinstance(v, str), v))
    if len(distinct) < 2:
        raise UserError(f"the label column {c.label_column!r} has {len(distinct)} distinct value(s); a classifier "
                        "needs at least 2")
    return [str(v) for v in distinct]


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
