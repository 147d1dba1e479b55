"""A training step never reads a device value on the host.

On a GPU every such read (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, a
boolean-mask index, ``nonzero``) makes the host wait until the accelerator has finished
all the work queued so far, so the host can no longer prepare the next batch while the
device computes. This machine has no GPU, so the test watches the reads themselves: a
``TorchFunctionMode`` sees every one that the training run makes. Runs of 3 and of 7
steps, logging, evaluating and saving only at the end, must make exactly as many reads:
the 4 extra steps add none. Reads that are of host tensors on any machine (the data path,
which runs before the batch is moved to the device; see ``HOST_SIDE``) are not counted.
"""

from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

import lmssl
from lmssl.train.loop import train
from tests.objectives.test_conformance import NAMES, smoke_config

READS = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "nonzero", "masked_select",
         "unique"}
INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}  # reads when indexed by a boolean mask
# Reads that are of host tensors by design: the data path (before the batch moves), and
# InfoNCE's range check of its indices, which it makes only when they are on the CPU.
HOST_SIDE = {"micro_batch", "stream", "prepare_batch", "_info_nce_logits"}
PACKAGE = str(Path(lmssl.__file__).parent)


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by the host, keyed by ``(what, where in lmssl)``."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name in INDEXING and any(
            isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in tree_leaves(args[1:]))
        if name in READS or boolean_index:
            frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(PACKAGE)]
            if not any(f.name in HOST_SIDE for f in frames):
                where = f"{frames[-1].filename[len(PACKAGE) + 1:]}:{frames[-1].lineno}" if frames else "?"
                self.seen[(name, where)] += 1
        return func(*args, **(kwargs or {}))


def reads_of_a_run(objective: str, steps: int, out) -> collections.Counter:
    cfg = smoke_config(objective, out, f"train.max_steps={steps}", "train.log_every=1000", "train.eval_every=0",
                       "train.save_every=0")
    with HostReads() as reads:
        train(cfg)
    return reads.seen


@pytest.mark.parametrize("objective", NAMES)
def test_training_steps_make_no_host_reads(tmp_path, objective):
    """Every registered objective, on its shrunk recipe (tests/objectives/test_conformance.py)."""
    short = reads_of_a_run(objective, 3, tmp_path / "short")
    long = reads_of_a_run(objective, 7, tmp_path / "long")
    per_step = {k: (long[k] - short[k]) / 4 for k in long.keys() | short.keys() if long[k] != short[k]}
    assert not per_step, f"reads of device values in every training step: {per_step}"
    assert sum(short.values()) > 0  # the end of a run (evaluation, log line, report) does read: the watch works


def test_a_host_read_in_the_step_is_seen(tmp_path):
    """The watch itself: a loss read on the host in every step is counted once per step."""
    from lmssl.objectives.causal_lm import CausalLM

    forward = CausalLM.forward

    def forward_and_read(self, batch):
        loss, metrics = forward(self, batch)
        float(loss.detach())  # what a careless logging line does
        return loss, metrics

    CausalLM.forward = forward_and_read
    try:
        short = reads_of_a_run("clm", 3, tmp_path / "short")
        long = reads_of_a_run("clm", 7, tmp_path / "long")
    finally:
        CausalLM.forward = forward
    assert sum(long.values()) - sum(short.values()) == 4, (short, long)
