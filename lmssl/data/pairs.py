"""Image-caption pairs for ``image_text`` objectives (CLIP): the bundled emoji, local files or a Hub dataset.

Sources, in order of precedence:

- ``data.train_files``: ``.parquet``, ``.jsonl``/``.json`` or ``.csv`` files with an image column
  (``vision.image_column``: a path, relative to the file's folder or absolute, or the
  ``{"bytes", "path"}`` struct that ``datasets`` writes) and a caption column
  (``data.text_column``); ``data.validation_files`` likewise.
- ``data.dataset``: a Hub dataset by name (``data.dataset_config``, ``data.train_split``,
  ``data.validation_split``) with the same two columns; ``data.streaming=true`` streams it.
- else the bundled emoji pairs (:mod:`lmssl.data.emoji`: 3,400 training and 255 held-out emoji,
  32 x 32 RGB; its ``captions`` column unless ``data.text_column`` names another of its columns).

Without validation files or a validation split, every ``round(1 / data.validation_fraction)``-th
pair is held out. A caption cell may be a string or a list of strings (COCO's five captions):
a list gives one of its captions per sample, drawn from the sample's global position, so a
pair's caption, like its view, does not depend on the number of processes or on a resume.
A label column (``vision.label_column``, optional) names the classes that zero-shot
classification scores (the bundled set: one class per held-out emoji, its name).

A batch is ``{"images": uint8 (B, C, L, L), "index": (B,) int64 global positions (held-out
pairs: ``-1 - i``), "views": the view parameters (when the objective has views), "input_ids":
(B, T) int64, "attention_mask": (B, T) int64, "labels": (B,) int64 (-1: none)}``. Images are
decoded on the CPU as :mod:`lmssl.data.images` does (``vision.load_size``); the views are cut
on the device by the objective. Captions are tokenized here by :func:`encode_captions`: the
start token when the tokenizer has one distinct from its end token (its bos, else its cls
token: ``<cls>`` for the shipped tokenizer, whose bos is its end of text; CLIP's
``<|startoftext|>``), the caption (cut to fit), the end-of-text token, then right padding to
the longest row of the batch; ``T`` is at most ``data.block_size``. A stream whose column types
are unknown (local json read with ``data.streaming=true``) is read the same way.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmssl.config import RunConfig
from lmssl.data.files import builder_for, load_hub_split, resolve_files
from lmssl.data.order import PositionKeyed
from lmssl.data.images import class_names, decode_image, position_stream, usable_workers
from lmssl.errors import UserError

CAPTION_STREAM = 1000  # counter_uniform stream of the caption draws (the views use streams 0, 1, ...)
PAIR_KINDS = ".parquet/.jsonl/.json/.csv"


# ----------------------------------------------------------------------------- tokens


def text_specials(tokenizer) -> tuple[int | None, int, int]:
    """``(start id or None, end-of-text id, pad id)`` of the captions: the end of text is the
    tokenizer's eos token (else its sep token); the start is its bos (else cls) token when that
    differs from the end; padding is its pad token, else the end of text."""
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise UserError("the tokenizer has neither an eos nor a sep token, so a caption has no end-of-text token to "
                        "pool; use a tokenizer with one (data.tokenizer)")
    start = next((t for t in (tokenizer.bos_token_id, tokenizer.cls_token_id) if t is not None and t != end), None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    return start, end, pad


def encode_captions(tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> ``(input_ids (B, T), attention_mask (B, T))`` int64, ``T <= max_len``: the
    start token (if any), the caption's tokens cut to fit, the end-of-text token, right padding.
    Every row holds exactly one end-of-text token among its real positions (its last), which
    is what the text tower pools."""
    start, end, pad = text_specials(tokenizer)
    room = max_len - 1 - (start is not None)
    if room < 1:
        raise UserError(f"data.block_size={max_len} leaves no room for a caption between its special tokens")
    texts = [t if isinstance(t, str) else "" for t in texts]
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = [([start] if start is not None else []) + [t for t in r if t != end][:room] + [end] for r in rows]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


# ----------------------------------------------------------------------------- sources


def describe_pairs(cfg: RunConfig) -> str:
    if cfg.data.train_files:
        return "pairs in " + ", ".join(cfg.data.train_files)
    if cfg.data.dataset:
        return cfg.data.dataset
    return "the bundled emoji pairs (lmssl/data/emoji)"


def _read_files(files: list[str], image_column: str, streaming: bool):
    """Local pair files -> one dataset; image paths made absolute against each file's folder."""
    import datasets

    kinds = {builder_for(f) for f in files}
    if None in kinds or "text" in kinds or len(kinds) > 1:
        raise UserError(f"image-caption pairs are read from one kind of {PAIR_KINDS} files with an image and a "
                        f"caption column; got {', '.join(files[:3])}")
    parts = []
    for f in files:
        try:
            ds = datasets.load_dataset(kinds.copy().pop(), data_files={"data": [f]}, split="data", streaming=streaming)
        except Exception as e:  # datasets raises many types for unreadable files
            raise UserError(f"could not read {f}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") \
                from None
        feature = ds.features.get(image_column) if ds.features is not None else None
        if feature is None or isinstance(feature, datasets.Value):  # paths (or a stream whose types are unknown)
            ds = ds.map(_path_resolver(image_column, Path(f).resolve().parent))
        parts.append(ds)
    if len(parts) == 1:
        return parts[0]
    if streaming:
        return datasets.interleave_datasets(parts, stopping_strategy="all_exhausted")
    return datasets.concatenate_datasets(parts)


def _path_resolver(column: str, folder: Path):
    """``row -> {column: ...}``: a relative path made absolute against ``folder``; other values kept."""
    def resolve(row: dict) -> dict:
        value = row.get(column)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            value = str(folder / value)
        return {column: value}

    return resolve


def _image_item(value) -> dict:
    """An image cell of a stream whose features are unknown -> the ``{"bytes", "path"}`` that
    :func:`~lmssl.data.images.decode_image` reads (a path, raw bytes, a struct or a PIL image)."""
    if isinstance(value, dict):
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    if isinstance(value, str):
        return {"bytes": None, "path": value}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if hasattr(value, "save"):  # a decoded PIL image
        import io

        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}
    raise UserError(f"cannot read an image from a {type(value).__name__} cell; the image column holds paths, bytes "
                    "or images")


def load_pairs(cfg: RunConfig, split: str, streaming: bool = False):
    """The ``split`` ('train' or 'validation') pairs as a ``datasets`` (Iterable)Dataset with
    columns ``image`` (not decoded: ``{"bytes", "path"}``), ``text`` (a string or a list of
    strings per row) and, when the data has one, ``label``."""
    import datasets

    datasets.disable_progress_bars()
    d, v = cfg.data, cfg.vision
    holdout = False
    image_column, text_column, label_column = v.image_column, d.text_column, v.label_column
    if d.train_files:
        if split == "validation" and d.validation_files:
            files = resolve_files(d.validation_files, "data.validation_files", kinds=PAIR_KINDS)
        else:
            files = resolve_files(d.train_files, "data.train_files", kinds=PAIR_KINDS)
            holdout = not d.validation_files
        ds = _read_files(files, image_column, streaming)
    elif d.dataset:
        ds, holdout = load_hub_split(d, split, streaming, local_hint="local pair files")
    else:
        if streaming:
            raise UserError("data.streaming=true streams a Hub dataset (data.dataset); the bundled emoji pairs are "
                            "read whole")
        from lmssl.data.emoji import load_bundled

        ds = load_bundled("train" if split == "train" else "validation")
        image_column, label_column = "image", "label"
        text_column = text_column if text_column in ds.column_names else "captions"
    names = ds.column_names
    if names is None:  # a stream that knows its columns only after the first row
        names = list(next(iter(ds)))
    for column, key in ((image_column, "vision.image_column"), (text_column, "data.text_column")):
        if column not in names:
            raise UserError(f"column '{column}' not found; the pairs have columns {names}: set {key}")
    keep = [image_column, text_column] + ([label_column] if label_column in names else [])
    ds = ds.select_columns(keep)
    renames = {image_column: "image", text_column: "text", label_column: "label"}
    for old, new in renames.items():
        if old in keep and old != new:
            ds = ds.rename_column(old, new)
    if ds.features is not None and "image" in ds.features:
        ds = ds.cast_column("image", datasets.Image(decode=False))
    else:  # a stream that does not know its types
        ds = ds.map(lambda row: {"image": _image_item(row["image"])})
    if holdout:
        every = max(2, round(1 / max(d.validation_fraction, 1e-6)))
        if streaming:
            keep_val = split == "validation"
            ds = ds.filter(lambda _, i: (i % every == 0) == keep_val, with_indices=True)
        else:
            ids = np.arange(len(ds))
            ds = ds.select(ids[ids % every == 0] if split == "validation" else ids[ids % every != 0])
    if split == "train" and d.max_documents > 0:
        ds = ds.take(d.max_documents) if streaming else ds.select(range(min(d.max_documents, len(ds))))
    if not streaming and len(ds) == 0:
        raise UserError(f"no {split} pairs: add pairs or lower data.validation_fraction")
    return ds


def pick_captions(texts: list, positions: torch.Tensor, seed: int) -> list[str]:
    """One caption per row: the cell itself, or for a list one of its captions drawn from the
    row's global position (``counter_uniform``: the same caption in every process layout)."""
    from lmssl.data.views import counter_uniform

    if all(isinstance(t, str) or t is None for t in texts):
        return [t or "" for t in texts]
    u = counter_uniform(seed, positions, CAPTION_STREAM, 1)[:, 0]
    out = []
    for t, x in zip(texts, u.tolist()):
        if isinstance(t, (list, tuple)):
            t = t[min(int(x * len(t)), len(t) - 1)] if t else ""
        out.append(t if isinstance(t, str) else "")
    return out


class _Labels:
    """A dataset's ``label`` column -> integer ids and class names (ClassLabel names, else the
    sorted distinct values; none without the column)."""

    def __init__(self, ds) -> None:
        self.names: list[str] = []
        self.to_id: dict[str, int] | None = None
        feature = ds.features.get("label") if ds.features is not None else None
        if feature is None:
            self.present = False
            return
        self.present = True
        if hasattr(feature, "names"):
            self.names = list(feature.names)
        elif hasattr(ds, "__len__"):
            self.names = class_names(ds)
            self.to_id = {n: i for i, n in enumerate(self.names)}

    def ids(self, values: list) -> list[int]:
        if not self.present:
            return [-1] * len(values)
        if self.to_id is not None:
            return [self.to_id.get(str(v), -1) for v in values]
        return [int(v) if isinstance(v, (int, np.integer)) else -1 for v in values]


def _batch(rows: list[dict], index: torch.Tensor, src) -> dict[str, Any]:
    """Decoded, tokenized batch of ``rows`` (dicts with image, text[, label])."""
    pixels = np.stack([r["_pixels"] for r in rows])  # (B, C, L, L)
    texts = pick_captions([r["text"] for r in rows], index, src.seed)
    ids, mask = encode_captions(src.tokenizer, texts, src.max_len)
    labels = torch.tensor(src.labels.ids([r.get("label") for r in rows]), dtype=torch.long)
    out: dict[str, Any] = {"images": torch.from_numpy(pixels), "index": index, "input_ids": ids,
                           "attention_mask": mask, "labels": labels}
    if src.views is not None:
        out["views"] = src.views.draw(index, (src.size, src.size))
    return out


class PairSource(PositionKeyed, torch.utils.data.Dataset):
    """Global sample positions -> decoded, tokenized pair batches (map-style: the bundled set,
    local files, a downloaded Hub dataset). ``shuffle``: training order, one permutation per
    epoch seeded by ``(seed, epoch)``; else position ``i`` is pair ``i``, drawn at ``-1 - i``."""

    def __init__(self, ds, cfg: RunConfig, tokenizer, shuffle: bool, views=None) -> None:
        self.ds, self.tokenizer, self.shuffle, self.views = ds, tokenizer, shuffle, views
        self.seed = cfg.train.seed
        self.channels = cfg.vision.channels
        self.size = cfg.vision.load_size or cfg.vision.image_size
        self.max_len = cfg.data.block_size
        self.n = len(ds)
        self.labels = _Labels(ds)

    def batch(self, positions: list[int]) -> dict[str, Any]:
        ids = self.ids(positions)
        rows = [self._row(i) for i in ids]
        index = torch.tensor(positions if self.shuffle else [-1 - g for g in positions], dtype=torch.long)
        return _batch(rows, index, self)

    def _row(self, pair_id: int) -> dict:
        """Pair ``pair_id`` with its decoded pixels; an undecodable image is replaced by the next pair's."""
        for step in range(min(self.n, 100)):
            row = self.ds[(pair_id + step) % self.n]
            try:
                row["_pixels"] = decode_image(row["image"], self.channels, self.size)
                return row
            except Exception as e:  # a truncated or corrupt file: use the next pair
                print(f"lmssl: warning: could not decode the image of pair {(pair_id + step) % self.n} "
                      f"({type(e).__name__}: {e}); using the next pair instead", file=sys.stderr)
        raise UserError("100 images in a row could not be decoded; check the image column")


class StreamingPairs:
    """Pairs of a streamed dataset at global positions: the stream, shuffled in a bounded
    buffer seeded by ``seed + epoch``, is a pure function of the data and the seed; its state
    is the number of pairs read, and :meth:`batch` skips forward to any position (each process
    reads the stream and keeps its own positions, so a resume lands on the same pairs)."""

    def __init__(self, cfg: RunConfig, tokenizer, views=None) -> None:
        self.cfg, self.tokenizer, self.views = cfg, tokenizer, views
        self.seed = cfg.train.seed
        self.channels = cfg.vision.channels
        self.size = cfg.vision.load_size or cfg.vision.image_size
        self.max_len = cfg.data.block_size
        self.labels = _Labels(load_pairs(cfg, "train", streaming=True))
        self._iter: Iterator[dict] | None = None
        self._pos = 0

    def _stream(self) -> Iterator[dict]:
        epoch = 0
        while True:
            ds = load_pairs(self.cfg, "train", streaming=True)
            ds = ds.shuffle(seed=self.seed + epoch, buffer_size=self.cfg.data.shuffle_buffer)
            produced = False
            for row in ds:
                try:
                    row["_pixels"] = decode_image(row["image"], self.channels, self.size)
                except Exception as e:  # skip it: the stream stays a pure function of data and seed
                    print(f"lmssl: warning: could not decode a streamed image ({type(e).__name__}: {e}); skipping "
                          "the pair", file=sys.stderr)
                    continue
                produced = True
                yield row
            if not produced:
                raise UserError("the streamed pairs hold no decodable image")
            epoch += 1

    def batch(self, positions: list[int]) -> dict[str, Any]:
        start, count = positions[0], len(positions)
        if self._iter is None or start < self._pos:
            self._iter, self._pos = self._stream(), 0
        while self._pos < start:
            next(self._iter)
            self._pos += 1
        rows = [next(self._iter) for _ in range(count)]
        self._pos += count
        return _batch(rows, torch.tensor(positions, dtype=torch.long), self)


# ----------------------------------------------------------------------------- the run's data


@dataclass
class HeldOutPairs:
    """The held-out pairs the evaluation scores, in dataset order: ``images`` uint8
    ``(N, C, L, L)``, their captions as ``input_ids``/``attention_mask`` ``(N, T)``, ``labels``
    ``(N,)`` (-1: none) and the ``classes`` zero-shot classification chooses among."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


@dataclass
class PairData:
    """What the trainer, the evaluation and the pictures read of an image-text run."""

    train: PairSource | StreamingPairs
    eval_batches: list[dict[str, Any]]
    train_pairs: int  # 0 when streaming (unknown)
    held_out: HeldOutPairs | None = None
    num_workers: int = 0
    unit: str = "pairs"  # throughput counts image-caption pairs (one image and one caption each)
    units_per_sample: int = 1

    def stream(self, cfg: RunConfig, cursor: int, rank: int, world: int) -> Iterator[tuple[dict[str, Any], int]]:
        """``(micro-batch, first global position)`` for every micro-step from ``cursor`` on."""
        workers = 0 if isinstance(self.train, StreamingPairs) else self.num_workers  # a stream reads in order
        yield from position_stream(self.train, cfg, cursor, rank, world, workers)


def held_out_pairs(cfg: RunConfig, tokenizer, limit: int = 0) -> HeldOutPairs:
    """The first ``limit`` (0: all) validation pairs, decoded and tokenized as for evaluation."""
    val = PairSource(load_pairs(cfg, "validation", streaming=False) if not cfg.data.streaming
                     else _first_rows(cfg, limit), cfg, tokenizer, shuffle=False)
    n = val.n if limit <= 0 else min(limit, val.n)
    chunks = [val.batch(list(range(i, min(i + 256, n)))) for i in range(0, n, 256)]
    T = max(c["input_ids"].shape[1] for c in chunks)
    _, _, pad = text_specials(tokenizer)
    ids = torch.cat([torch.nn.functional.pad(c["input_ids"], (0, T - c["input_ids"].shape[1]), value=pad)
                     for c in chunks])
    mask = torch.cat([torch.nn.functional.pad(c["attention_mask"], (0, T - c["attention_mask"].shape[1]))
                      for c in chunks])
    texts = pick_captions([val.ds[i]["text"] for i in range(n)], torch.tensor([-1 - i for i in range(n)]), val.seed)
    return HeldOutPairs(torch.cat([c["images"] for c in chunks]), ids, mask, torch.cat([c["labels"] for c in chunks]),
                        val.labels.names, texts)


def _first_rows(cfg: RunConfig, limit: int):
    """The first ``limit`` validation pairs of a streamed dataset, as an in-memory dataset."""
    import datasets

    rows = list(load_pairs(cfg, "validation", streaming=True).take(max(limit, cfg.data.eval_blocks, 1)))
    if not rows:
        raise UserError("the streamed validation pairs are empty; check data.validation_split")
    for row in rows:  # one column type: a caption becomes a list of one (pick_captions reads it the same)
        row["text"] = [row["text"]] if isinstance(row["text"], str) or row["text"] is None else list(row["text"])
    return datasets.Dataset.from_list(rows).cast_column("image", datasets.Image(decode=False))


def build_pair_data(cfg: RunConfig, tokenizer, log=print, views=None) -> PairData:
    """Training source, the fixed held-out batches (the first ``data.eval_blocks`` validation
    pairs) and the held-out set of the evaluation (``monitor.query_images`` pairs)."""
    if cfg.data.streaming:
        train = StreamingPairs(cfg, tokenizer, views)
        train_pairs = 0
        val = PairSource(_first_rows(cfg, max(cfg.data.eval_blocks, cfg.monitor.query_images)), cfg, tokenizer,
                         shuffle=False, views=views)
    else:
        train_ds = load_pairs(cfg, "train")
        train = PairSource(train_ds, cfg, tokenizer, shuffle=True, views=views)
        train_pairs = len(train_ds)
        val = PairSource(load_pairs(cfg, "validation"), cfg, tokenizer, shuffle=False, views=views)
    n = val.n if cfg.data.eval_blocks <= 0 else min(cfg.data.eval_blocks, val.n)
    mb = cfg.train.micro_batch_size
    eval_batches = [val.batch(list(range(i, min(i + mb, n)))) for i in range(0, n, mb)]
    held = held_out_pairs(cfg, tokenizer, cfg.monitor.query_images) if cfg.monitor.query_images > 0 else None
    workers = usable_workers(cfg.data.num_workers, log)
    if workers and cfg.data.streaming:
        log("note: a streamed dataset is read in the training process (data.num_workers is ignored)")
    log(f"pairs: {f'{train_pairs:,}' if train_pairs else 'streamed'} for training from {describe_pairs(cfg)}, "
        f"{n:,} held out for the loss" + (f", {len(held.images):,} for retrieval and zero-shot "
                                           f"({len(held.classes)} classes)" if held is not None else ""))
    return PairData(train, eval_batches, train_pairs, held, workers)
