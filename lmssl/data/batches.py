"""From a global sample cursor to this process's micro-batches.

The unit of data position is the *global sample cursor*: the number of samples (blocks)
consumed by the whole run. Optimizer step ``s`` consumes samples ``[c, c + G)`` with
``G = micro_batch_size * grad_accum * world_size``; micro-step ``a`` of process ``r`` takes
``[c + (a * world + r) * micro, ... + micro)``. The global order of samples therefore does
not depend on how a global batch is split over processes and accumulation steps, and a
checkpoint only needs the cursor to resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from lmssl.config import RunConfig
from lmssl.data.text import PackedBlocks, StreamingBlocks, load_documents, tokenize_batch, tokenize_corpus
from lmssl.errors import UserError


@dataclass
class TextData:
    train: PackedBlocks | StreamingBlocks
    eval_batches: list[dict[str, torch.Tensor]]
    bytes_per_token: float  # UTF-8 bytes per token on held-out text (for bits-per-byte)
    train_tokens: int  # tokens in the training corpus (0 when streaming: unknown)
    units_per_sample: int = 0  # tokens per block (throughput counts tokens)
    unit: str = "tokens"

    def stream(self, cfg: RunConfig, cursor: int, rank: int, world: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """``(micro-batch, first global sample index)`` for every micro-step from ``cursor`` on."""
        global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * world
        while True:
            for a in range(cfg.train.grad_accum):
                yield micro_batch(self, cfg, cursor, a, rank, world)
            cursor += global_batch


def build_text_data(cfg: RunConfig, tokenizer, log=print) -> TextData:
    d = cfg.data
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if d.streaming:
        train = StreamingBlocks(d, tokenizer, cfg.train.seed)
        train_tokens = 0
        eval_rows, bpt = _stream_eval_blocks(cfg, tokenizer)
        eval_batches = [{"input_ids": torch.from_numpy(eval_rows[i:i + cfg.train.micro_batch_size])}
                        for i in range(0, len(eval_rows), cfg.train.micro_batch_size)]
    else:
        tf = tokenize_corpus(d, tokenizer, "train", log)
        train = PackedBlocks(tf, d.block_size, d.packing, pad_id)
        train_tokens = len(tf.tokens)
        vf = tokenize_corpus(d, tokenizer, "validation", log)
        val = PackedBlocks(vf, d.block_size, d.packing, pad_id)
        n = len(val) if d.eval_blocks <= 0 else min(d.eval_blocks, len(val))
        mb = cfg.train.micro_batch_size
        eval_batches = [val.batch(np.arange(i, min(i + mb, n))) for i in range(0, n, mb)]
        bpt = vf.bytes_per_token
    return TextData(train, eval_batches, bpt, train_tokens, d.block_size)


def _stream_eval_blocks(cfg: RunConfig, tokenizer) -> tuple[np.ndarray, float]:
    """The first ``eval_blocks`` packed blocks of the streamed validation documents."""
    ds = load_documents(cfg.data, "validation", streaming=True)
    want, bs = max(1, cfg.data.eval_blocks), cfg.data.block_size
    buf: list[int] = []
    n_bytes = n_tokens = 0
    for batch in ds.iter(batch_size=64):
        ids, b, _ = tokenize_batch(tokenizer, batch["text"], tokenizer.eos_token_id)
        n_bytes += b
        for row in ids:
            n_tokens += len(row)
            buf.extend(row)
        if len(buf) >= want * bs:
            break
    rows = len(buf) // bs
    if rows == 0:
        raise UserError("the validation data holds less than one block; add validation text or lower data.block_size")
    return np.asarray(buf[: min(rows, want) * bs], dtype=np.int64).reshape(-1, bs), n_bytes / max(1, n_tokens)


def micro_batch(data, cfg: RunConfig, cursor: int, micro_step: int, rank: int, world: int) -> tuple[dict[str, torch.Tensor], int]:
    """This process's micro-batch ``micro_step`` of the optimizer step starting at ``cursor``.

    ``data``: :class:`TextData`. Returns ``(batch, first_global_sample_index)``; the index
    seeds any per-batch randomness (e.g. MLM masks) so that it too is independent of the
    process layout.
    """
    mb = cfg.train.micro_batch_size
    start = cursor + (micro_step * world + rank) * mb
    if isinstance(data.train, StreamingBlocks):  # addressed by cursor directly
        return data.train.batch_at(start, mb), start
    idx = data.train.sample_ids(start, mb, cfg.train.seed)
    return data.train.batch(idx), start


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move a CPU batch (a dict, list or tuple of tensors, nested: image views' parameters)
    to ``device`` without making the host wait: on CUDA each tensor is copied from
    page-locked (pinned) memory, so the copy runs while the accelerator is still busy with
    the previous step. Values that are not tensors pass through."""
    device = torch.device(device)
    if isinstance(batch, torch.Tensor):
        pin = device.type == "cuda" and batch.device.type == "cpu" and not batch.is_pinned()
        return (batch.pin_memory() if pin else batch).to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch
