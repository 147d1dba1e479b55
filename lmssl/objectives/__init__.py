"""One module per pretraining method: backbone + heads + what is hidden + loss.

The contract
============

An objective is a subclass of :class:`Objective` (an ``nn.Module``) in its own file under
``lmssl/objectives/`` (or in any installed package that advertises it under the
``lmssl.objectives`` entry-point group), decorated with :func:`register`. The file holds
everything the method is:

class attributes
    ``name`` (the value of ``objective:`` in a recipe), ``modality`` (``"text"``,
    ``"images"`` or ``"image_text"``: which data the trainer builds), ``Config`` (the
    dataclass of the YAML section named ``name``, or ``None``; :class:`lmssl.config.RunConfig`
    composes every registered section, so ``cfg.mae`` is MAE's), ``description`` (one
    line for model cards), ``loss_label`` (the y-axis of the loss curve), ``metric_names``
    (how the end-of-run summary names its metrics), ``recipe`` (its shipped CPU recipe) and
    ``smoke_overrides`` (what shrinks that recipe to seconds, for the conformance test).

``build(cfg, tokenizer)`` (classmethod)
    The objective for a :class:`~lmssl.config.RunConfig`; ``tokenizer`` is ``None`` for
    image objectives. ``validate_config(cfg)`` (classmethod) raises one-line
    :class:`~lmssl.errors.UserError` s for values of its section a type check cannot catch.

``prepare_batch(batch, generator) -> batch``
    CPU-side work on a collated batch (MLM masking, MAE masks), every draw from the given
    ``torch.Generator``, which the trainer seeds from the batch's first global sample
    position: the draws do not depend on the number of processes, and replay on resume.

``forward(batch) -> (loss, metrics)``
    ``loss`` a scalar tensor; ``metrics`` a dict of detached scalar tensors (``loss``
    among them) that the trainer averages and logs, reading them only at log steps.

``features(batch) -> (B, D)``
    The representation of each sample that ``lmssl probe``, the k-NN and collapse
    monitors and fine-tuning read (text: ``input_ids``/``attention_mask``; images:
    ``images`` uint8, see :mod:`lmssl.data.images`).

``flops_per_sample() -> float``
    Training FLOPs (forward + backward) per sample: a sequence of ``data.block_size``
    tokens, or one image with all of its views; the trainer's MFU comes from it.

``report(tokenizer, eval_batches, cfg, out_dir) -> str``
    The end-of-run picture (generated text, filled masks, reconstructions), returned as
    text for the console. ``begin(data, out_dir) -> str`` is the same at the start of a
    run (augmented view pairs).

``eval_metrics(ev, data, log) -> dict``
    Extra held-out metrics computed from the averaged ``ev`` (perplexity) or from the
    data (k-NN, collapse); called at each evaluation, on every process.

``param_groups(optim) -> list[dict]``
    The optimizer's parameter groups (default: weight decay on tensors with ``dim >= 2``);
    a group may set its own ``lr`` (peak), ``weight_decay`` and ``lars_exclude``.

``after_step(step, skipped)``
    Runs once per optimizer step, after it: EMA teachers, centres, momentum and
    temperature schedules. ``skipped`` is a 0-dim float tensor on the device (1.0: the
    step was skipped as non-finite), so the hook never makes the host wait.

``should_stop() -> bool``
    Asked after every evaluation and when a run resumes: True ends the run there, saved as
    at its last step (early stopping; fine-tuning's classifier uses it). Default: never.

``backbone``
    The module :mod:`lmssl.export` maps onto a ``transformers`` backbone when the objective
    has no converter of its own (text: ``TextBackbone``; images: ``VisionBackbone``).

The trainer, resume, probes, monitors, export and the conformance test
(``tests/objectives/test_conformance.py``) then work for a new objective with no edit
anywhere else. Objectives shared structure lives one layer down: heads in
:mod:`lmssl.models.heads`, losses in :mod:`lmssl.losses`, views in :mod:`lmssl.data.views`;
the image objectives share :class:`lmssl.objectives._image.ImageObjective` (views, online
probe, monitors).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

from lmssl import registry

Batch = dict[str, Any]


class Objective(nn.Module):
    """Base class of every pretraining method (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    modality: ClassVar[str] = "text"  # text | images | image_text
    Config: ClassVar[type | None] = None  # dataclass of the YAML section `name`
    description: ClassVar[str] = ""  # one line: what the method learns (model cards)
    loss_label: ClassVar[str] = "loss"  # y-axis label of the loss curve
    metric_names: ClassVar[dict[str, str]] = {}  # metric key -> how the end-of-run summary names it
    recipe: ClassVar[str] = ""  # the shipped CPU recipe (recipes/<recipe>.yaml) that trains this method
    # overrides that shrink `recipe` to a run of seconds (a few-layer, 64-wide model): the
    # conformance test trains every registered objective with them
    smoke_overrides: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def build(cls, cfg, tokenizer) -> Objective:
        raise NotImplementedError(f"{cls.__name__} must define build(cfg, tokenizer)")

    @classmethod
    def validate_config(cls, cfg) -> None:
        """Raise a one-line UserError for a bad value of this objective's section."""

    def prepare_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        return batch

    def features(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define features(batch) -> (B, D)")

    def flops_per_sample(self) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define flops_per_sample()")

    def report(self, tokenizer, eval_batches: list[Batch], cfg, out_dir) -> str:
        return ""

    def begin(self, data, out_dir) -> str:
        return ""

    def eval_metrics(self, ev: dict[str, float], data, log: Callable[[str], None]) -> dict[str, float]:
        return {}

    def param_groups(self, optim) -> list[dict]:
        return decay_groups(self.parameters(), optim.weight_decay)

    def after_step(self, step: int, skipped: torch.Tensor) -> None:
        """Once per optimizer step, after it (``skipped``: 0-dim float on the device)."""

    def should_stop(self) -> bool:
        """After an evaluation (and on resume): True ends the run (early stopping)."""
        return False


def decay_groups(parameters, weight_decay: float) -> list[dict]:
    """Weight decay on tensors with ``dim >= 2`` (matrices, embeddings); none on biases and
    norms, which LARS also leaves unadapted (``lars_exclude``)."""
    decay, no_decay = [], []
    for p in {id(p): p for p in parameters if p.requires_grad}.values():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` available as ``objective: <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
    if cls.modality not in ("text", "images", "image_text"):
        raise ValueError(f"{cls.__name__}.modality must be text, images or image_text, got {cls.modality!r}")
    registry.add(cls)
    return cls


def get(name: str) -> type[Objective]:
    """The registered objective class called ``name`` (one-line error naming the others)."""
    return registry.get(name)


def names() -> list[str]:
    return sorted(registry.discover())


def build(cfg, tokenizer) -> Objective:
    """Instantiate ``cfg.objective`` (text objectives complete the model config from the tokenizer)."""
    return get(cfg.objective).build(cfg, tokenizer)


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``h (B, T, D)``, ``mask (B, T)`` (1: real token) -> ``(B, D)`` mean over real tokens."""
    if mask is None:
        return h.mean(dim=1)
    w = mask.to(h.dtype)[..., None]  # (B, T, 1)
    return (h * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
