"""Text data: load with ``datasets``, tokenize in batches, pack into fixed-length blocks.

Two sources feed the trainer, both addressed by a single *global sample cursor* so that
a run resumes exactly whatever the number of processes:

- :class:`PackedBlocks` (map-style): the corpus is tokenized once into a flat token file
  in the cache (keyed by the files, the tokenizer and the block size), then read as
  blocks; epoch ``e`` visits blocks in a permutation seeded by ``(seed, e)``.
- :class:`StreamingBlocks`: documents stream from ``datasets`` (local or Hub), are
  shuffled in a bounded buffer, tokenized and packed on the fly; the cursor counts the
  blocks already produced.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lmssl.config import DataConfig
from lmssl.data.files import builder_for, cache_dir, load_hub_split, resolve_files
from lmssl.errors import UserError

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
BUNDLED = {"train": [str(CORPUS_DIR / "kjv_train.txt")], "validation": [str(CORPUS_DIR / "kjv_validation.txt")]}
REPLACEMENT = "\ufffd"


# ----------------------------------------------------------------------------- documents


def load_documents(cfg: DataConfig, split: str, streaming: bool | None = None):
    """The ``split`` ('train' or 'validation') documents as a ``datasets`` (Iterable)Dataset
    with one string column ``text``.

    Local files when ``train_files`` is set, else the Hub dataset ``cfg.dataset``, else the
    bundled corpus. With no validation files or split, every ``round(1/validation_fraction)``-th
    training document is held out for validation (and skipped in training).
    """
    import datasets

    datasets.disable_progress_bars()
    streaming = cfg.streaming if streaming is None else streaming
    holdout = False
    if cfg.train_files or not cfg.dataset:
        if split == "validation" and cfg.validation_files:
            files = resolve_files(cfg.validation_files, "data.validation_files")
        elif not cfg.train_files:
            files = BUNDLED[split]
        else:
            files = resolve_files(cfg.train_files, "data.train_files")
            holdout = not cfg.validation_files
        builder = _one_builder(files)
        kwargs = {"encoding_errors": "replace"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files={"data": files}, split="data", streaming=streaming, **kwargs)
        except Exception as e:  # datasets raises many types for unreadable files
            raise UserError(f"could not read {files[0]}{' and others' if len(files) > 1 else ''}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    else:
        ds, holdout = load_hub_split(cfg, split, streaming)
    column = "text" if builder_is_text(ds) else cfg.text_column
    names = _column_names(ds)
    if column not in names:
        raise UserError(f"text column '{column}' not found; the data has columns {names}: set data.text_column")
    if names != [column]:
        ds = ds.select_columns([column])
    if column != "text":
        ds = ds.rename_column(column, "text")
    if holdout:
        every = max(2, round(1 / max(cfg.validation_fraction, 1e-6)))
        keep_val = split == "validation"
        ds = ds.filter(lambda _, i: (i % every == 0) == keep_val, with_indices=True)
    if split == "train" and cfg.max_documents > 0:
        ds = ds.take(cfg.max_documents) if streaming else ds.select(range(min(cfg.max_documents, len(ds))))
    return ds


def _one_builder(files: list[str]) -> str:
    kinds = {builder_for(f) for f in files}
    if None in kinds:
        bad = next(f for f in files if builder_for(f) is None)
        raise UserError(f"cannot tell how to read '{bad}': use .txt, .json, .jsonl, .csv or .parquet files")
    if len(kinds) > 1:
        raise UserError(f"the data files mix kinds {sorted(kinds)}; give one kind of file per list")
    return kinds.pop()


def builder_is_text(ds) -> bool:
    names = _column_names(ds)
    return names == ["text"]


def _column_names(ds) -> list[str]:
    names = ds.column_names
    if names is None:  # some streaming datasets only know their columns after the first row
        first = next(iter(ds), None)
        if first is None:
            raise UserError("the dataset yields no rows; check the files or the split name")
        names = list(first)
    return list(names)


# ----------------------------------------------------------------------------- tokenizing


def tokenize_batch(tokenizer, texts: list[str], eos_id: int) -> tuple[list[list[int]], int, int]:
    """Tokenize documents and append the end-of-document token.

    Returns ``(ids, n_bytes, n_replaced)``: UTF-8 bytes of the text (for bits-per-byte)
    and the count of replacement characters from undecodable input.
    """
    texts = [t if isinstance(t, str) else "" for t in texts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for row in ids:
        row.append(eos_id)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return ids, n_bytes, sum(t.count(REPLACEMENT) for t in texts)


def tokenizer_fingerprint(tokenizer) -> str:
    raw = tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer)
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@dataclass
class TokenFile:
    """A tokenized corpus on disk: flat ``tokens`` (N,) and document start ``offsets`` (D+1,)."""

    tokens: np.ndarray
    offsets: np.ndarray
    n_bytes: int
    n_replaced: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, len(self.tokens))


def tokenize_corpus(cfg: DataConfig, tokenizer, split: str, log=print) -> TokenFile:
    """Tokenize the whole ``split`` once into the cache and memory-map it; later calls with
    the same files, tokenizer and settings read the cache instead of re-tokenizing."""
    ds_key = _source_key(cfg, split) + tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(ds_key.encode()).hexdigest()[:20]
    folder = cache_dir() / "tokens" / key
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return TokenFile(np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "offsets.npy"),
                         meta["n_bytes"], meta["n_replaced"])
    ds = load_documents(cfg, split, streaming=False)
    dtype = np.uint16 if len(tokenizer) < 2**16 else np.int32
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no end-of-text token; train one with `lmssl tokenizer train`")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"tokens.bin.tmp{os.getpid()}"
    lengths: list[int] = []
    n_bytes = n_replaced = 0
    from tqdm.auto import tqdm

    with open(tmp, "wb") as out:
        for batch in tqdm(ds.iter(batch_size=1000), total=(len(ds) + 999) // 1000, desc=f"tokenize {split}",
                          unit="batch", leave=False, disable=len(ds) < 20000):
            ids, b, r = tokenize_batch(tokenizer, batch["text"], eos)
            n_bytes, n_replaced = n_bytes + b, n_replaced + r
            for row in ids:
                lengths.append(len(row))
                np.asarray(row, dtype=dtype).tofile(out)
    if not lengths or sum(lengths) == len(lengths):
        tmp.unlink(missing_ok=True)
        raise UserError(f"the {split} data holds no text; check the files or data.text_column")
    tokens = np.fromfile(tmp, dtype=dtype)
    np.save(folder / "tokens.npy", tokens)
    np.save(folder / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    tmp.unlink()
    meta_tmp = folder / "meta.json.tmp"
    meta_tmp.write_text(json.dumps({"n_bytes": n_bytes, "n_replaced": n_replaced, "documents": len(lengths),
                                    "tokens": int(len(tokens))}))
    os.replace(meta_tmp, meta_path)
    if n_replaced:
        log(f"warning: {n_replaced} undecodable byte sequences in the {split} data were replaced with U+FFFD")
    return TokenFile(np.load(folder / "tokens.npy", mmap_mode="r"), np.load(folder / "offsets.npy"), n_bytes,
                     n_replaced)


def _source_key(cfg: DataConfig, split: str) -> str:
    parts = [split, cfg.text_column, str(cfg.validation_fraction), str(cfg.max_documents)]
    if cfg.train_files or not cfg.dataset:
        lists = [cfg.train_files, cfg.validation_files]
        files = []
        for lst, name in zip(lists, ("data.train_files", "data.validation_files")):
            if lst:
                files += resolve_files(lst, name)
        if not cfg.train_files:
            files += BUNDLED[split]
        for f in files:
            st = os.stat(f)
            parts.append(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}")
    else:
        parts += [cfg.dataset, cfg.dataset_config, cfg.train_split, cfg.validation_split]
    return "|".join(parts)


# ----------------------------------------------------------------------------- samples


class PackedBlocks:
    """Map-style samples over a :class:`TokenFile`.

    ``packing=True``: the flat token stream cut into ``block_size`` blocks (documents
    separated by the end-of-text token). ``packing=False``: one document per sample,
    truncated to ``block_size`` and padded at collation.
    """

    def __init__(self, tf: TokenFile, block_size: int, packing: bool = True, pad_id: int = 0) -> None:
        self.tf, self.block_size, self.packing, self.pad_id = tf, block_size, packing, pad_id
        self.n = len(tf.tokens) // block_size if packing else len(tf.offsets) - 1
        self._order_key: tuple[int, int] | None = None
        self._order = np.empty(0, dtype=np.int64)
        if self.n == 0:
            raise UserError(f"the data holds {len(tf.tokens)} tokens, fewer than one block of data.block_size="
                            f"{block_size}; add text or lower the block size")

    def __len__(self) -> int:
        return self.n

    def order(self, epoch: int, seed: int) -> np.ndarray:
        """Visiting order of epoch ``epoch``: a permutation seeded by ``(seed, epoch)``."""
        if self._order_key != (epoch, seed):
            self._order = np.random.default_rng([seed, epoch]).permutation(self.n)
            self._order_key = (epoch, seed)
        return self._order

    def sample_ids(self, start: int, count: int, seed: int, shuffle: bool = True) -> np.ndarray:
        """Sample indices at global cursor positions ``start .. start+count`` (crossing epochs)."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            g = start + i
            epoch, pos = divmod(g, self.n)
            out[i] = self.order(epoch, seed)[pos] if shuffle else pos
        return out

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """``idx (b,)`` -> ``input_ids (b, T)`` (+ ``attention_mask (b, T)`` when unpacked)."""
        bs = self.block_size
        if self.packing:
            rows = np.stack([np.asarray(self.tf.tokens[i * bs:(i + 1) * bs]) for i in idx])
            return {"input_ids": torch.from_numpy(rows.astype(np.int64))}
        docs = [np.asarray(self.tf.tokens[self.tf.offsets[i]:self.tf.offsets[i + 1]][:bs]) for i in idx]
        T = max(len(d) for d in docs)
        ids = np.full((len(docs), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(docs), T), dtype=np.int64)
        for r, d in enumerate(docs):
            ids[r, : len(d)], mask[r, : len(d)] = d, 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


class StreamingBlocks:
    """Blocks packed on the fly from a streamed ``datasets.IterableDataset``.

    The stream of blocks is a pure function of (data, tokenizer, seed): documents are
    shuffled in a bounded buffer with ``seed + epoch``, tokenized, and packed. The state
    is the number of blocks already produced; :meth:`blocks_from` skips to it.
    """

    def __init__(self, cfg: DataConfig, tokenizer, seed: int) -> None:
        self.cfg, self.tokenizer, self.seed = cfg, tokenizer, seed
        self.block_size = cfg.block_size
        self._iter: Iterator[np.ndarray] | None = None
        self._pos = 0
        self.n_bytes = self.n_tokens = 0

    def _stream(self) -> Iterator[np.ndarray]:
        epoch = 0
        eos = self.tokenizer.eos_token_id
        bs = self.block_size
        while True:
            ds = load_documents(self.cfg, "train", streaming=True)
            ds = ds.shuffle(seed=self.seed + epoch, buffer_size=self.cfg.shuffle_buffer)
            buf: list[int] = []
            produced = False
            for batch in ds.iter(batch_size=256):
                ids, b, _ = tokenize_batch(self.tokenizer, batch["text"], eos)
                self.n_bytes += b
                for row in ids:
                    self.n_tokens += len(row)
                    buf.extend(row)
                while len(buf) >= bs:
                    produced = True
                    yield np.asarray(buf[:bs], dtype=np.int64)
                    del buf[:bs]
            if not produced:
                raise UserError("the streamed data holds less than one block of text")
            epoch += 1

    def blocks_from(self, cursor: int, count: int) -> np.ndarray:
        """Blocks at global positions ``cursor .. cursor+count``; ``(count, block_size)``."""
        if self._iter is None or cursor < self._pos:
            self._iter, self._pos = self._stream(), 0
        while self._pos < cursor:
            next(self._iter)
            self._pos += 1
        rows = [next(self._iter) for _ in range(count)]
        self._pos += count
        return np.stack(rows)

    def batch_at(self, cursor: int, count: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.blocks_from(cursor, count))}

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, self.n_tokens)
