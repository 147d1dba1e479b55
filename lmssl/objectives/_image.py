"""What every image objective shares: its views, the online linear probe and the monitors.

:class:`ImageObjective` owns the parts solo-learn's base method owns, so that a method file
adds only its heads, its views and its loss:

- ``views``: the objective's :class:`~lmssl.data.views.ViewTransform` (``make_views``,
  a classmethod, because the data pipeline draws the views' parameters per sample before
  the objective exists); :meth:`view_images` cuts the views of a batch on its device,
  :meth:`plain_images` gives the unaugmented images (resized to ``vision.image_size``,
  normalised) that :meth:`features` and the monitors read.
- the online linear probe (``monitor.online_probe``, on when the data has labels): a
  linear classifier (behind a batch norm without parameters) on the *detached* features
  that the method computes anyway during its step (:meth:`probe_step`), trained in its own optimizer group (``monitor.probe_lr``,
  no weight decay, no LARS adaptation). Stop-gradient: it reads the representation and
  never shapes it. Its held-out accuracy is reported at every evaluation.
- the monitors, at every evaluation (:meth:`eval_metrics`): weighted k-NN accuracy of the
  held-out ``monitor.query_images`` against ``monitor.bank_images`` training images, the
  online probe's held-out accuracy, and the collapse metrics of the held-out features
  (:mod:`lmssl.evaluate.collapse`), with a warning line when they say "collapsed".
- the picture at the start of a run: the views of eight held-out images (``views.png``).

Labels are read only here, by the monitors; no method's loss sees them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmssl.evaluate import knn_accuracy
from lmssl.evaluate.collapse import collapse_metrics, collapse_warning
from lmssl.models import eval_mode
from lmssl.objectives import Batch, Objective, decay_groups


class ImageObjective(Objective):
    """Base of the image objectives; subclasses define ``make_views``, :meth:`embed`,
    ``forward`` (calling :meth:`probe_step` on features they already have) and ``flops_per_sample``."""

    modality = "images"
    pool: ClassVar[str] = "cls"  # how embed() pools a ViT backbone: cls | mean
    # joint-embedding methods can collapse to a constant; a reconstruction objective (MAE)
    # cannot, and its mean-pooled features share one large direction from initialisation on,
    # so it reports the collapse metrics without the warning
    warn_on_collapse: ClassVar[bool] = True

    view_preset: ClassVar[str] = ""  # a preset of lmssl.data.views (e.g. "simclr_views") that make_views uses

    def __init__(self, cfg, feature_dim: int | None = None, backbone: nn.Module | None = None) -> None:
        """``backbone``: the module :meth:`embed` pools (``self.backbone``; its ``dim`` is
        the feature width); or give ``feature_dim`` and set up the encoder yourself."""
        super().__init__()
        if backbone is not None:
            self.backbone = backbone
            feature_dim = backbone.dim
        if feature_dim is None:
            raise ValueError(f"{type(self).__name__}: give ImageObjective a backbone or a feature_dim")
        self.vision, self.monitor = cfg.vision, cfg.monitor
        self.micro_batch, self.grad_accum = cfg.train.micro_batch_size, cfg.train.grad_accum
        self.views = type(self).make_views(cfg)
        n = cfg.vision.num_classes
        self.embed_dim = feature_dim
        # batch norm without affine parameters in front of the linear layer (MAE's linear probe):
        # the probe sees standardised features whatever their scale, which moves during pretraining
        self.online_probe = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, n)) \
            if cfg.monitor.online_probe and n > 1 else None

    @classmethod
    def build(cls, cfg, tokenizer=None):
        return cls(cfg)

    @classmethod
    def make_views(cls, cfg):
        """The :class:`~lmssl.data.views.ViewTransform` this method trains on: ``view_preset``
        at ``vision.image_size`` unless a method defines its own."""
        from lmssl.data import views

        if not cls.view_preset:
            raise NotImplementedError(f"{cls.__name__} must set view_preset or define make_views(cfg)")
        v = cfg.vision
        return views.ViewTransform(getattr(views, cls.view_preset)(v.image_size), v.mean, v.std, cfg.train.seed)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``images (B, C, H, W)`` -> features ``(B, D)``: the pooled ``backbone``
        (a ViT's class token or patch mean, by ``pool``; a ResNet's average pool)."""
        return self.backbone.pooled(images, self.pool)

    def backbone_flops(self, size: int, backward: bool = True) -> float:
        """FLOPs of the backbone on one ``size x size`` image: forward and backward (3x the
        forward), or the forward alone (an EMA target)."""
        from lmssl.models import VisionBackbone
        from lmssl.models.vision import forward_flops

        if isinstance(self.backbone, VisionBackbone):
            train = vit_flops(self.backbone, size)
        else:
            device = next(self.backbone.parameters()).device
            train = 3.0 * forward_flops(self.backbone, torch.zeros(2, self.vision.channels, size, size, device=device))
        return train if backward else train / 3.0

    # ------------------------------------------------------------------ inputs

    def view_images(self, batch: Batch) -> list[torch.Tensor]:
        """The views of ``batch["images"]`` (uint8) under ``batch["views"]``: float ``(B, C, s, s)`` each."""
        return self.views.apply(batch["images"], batch["views"])

    def plain_images(self, batch: Batch) -> torch.Tensor:
        """Unaugmented images ``(B, C, S, S)``, ``S = vision.image_size``, normalised."""
        return self.views.plain(batch["images"], self.vision.image_size)

    def features(self, batch: Batch) -> torch.Tensor:
        return self.embed(self.plain_images(batch))

    # ------------------------------------------------------------------ online probe

    def probe_step(self, feats: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The online probe's loss on ``feats (B, D)`` (detached here) and its metrics; a
        zero loss and no metrics when the probe is off. Rows with label -1 are not scored."""
        if self.online_probe is None or "labels" not in batch:
            return feats.new_zeros(()), {}
        labels = batch["labels"]
        logits = self.online_probe(feats.detach().float())  # (B, classes)
        valid = (labels >= 0).float()
        count = valid.sum().clamp_min(1.0)
        loss = (F.cross_entropy(logits, labels.clamp_min(0), reduction="none") * valid).sum() / count
        accuracy = ((logits.argmax(dim=1) == labels).float() * valid).sum() / count
        return loss, {"probe_loss": loss.detach(), "probe_accuracy": accuracy}

    def param_groups(self, optim) -> list[dict]:
        probe = set(map(id, self.online_probe.parameters())) if self.online_probe is not None else set()
        groups = decay_groups((p for p in self.parameters() if id(p) not in probe), optim.weight_decay)
        if self.online_probe is not None:
            groups.append({"params": list(self.online_probe.parameters()), "lr": self.monitor.probe_lr,
                           "weight_decay": 0.0, "lars_exclude": True})
        return groups

    # ------------------------------------------------------------------ monitors

    def _collapsing(self, m: dict[str, float]) -> bool:
        """Whether to warn: the rank test of :func:`~lmssl.evaluate.collapse.collapse_warning`
        (embeddings on a line or a point) at any evaluation, its spread test only once the
        spread has fallen to half its best value in this run. A randomly initialised network
        maps every image to nearly one direction (its features share a large mean), which
        reads as a low spread before any training: that is where a run starts, not a collapse."""
        best = max(getattr(self, "_best_std_ratio", 0.0), m["std_ratio"])
        self._best_std_ratio = best
        rank_floor = max(2.0, 0.01 * min(self.monitor.query_images - 1, self.embed_dim))
        falling = m["std_ratio"] < 0.2 and m["std_ratio"] < 0.5 * best
        return not all(math.isfinite(v) for v in m.values()) or m["effective_rank"] < rank_floor or falling

    @torch.no_grad()
    def embed_all(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Features of uint8 ``images (N, C, L, L)`` in eval mode: ``(N, D)`` float32 on the CPU."""
        device = next(self.parameters()).device
        with eval_mode(self):
            return torch.cat([self.features({"images": x.to(device)}).float().cpu()
                              for x in images.split(batch_size)]) if len(images) else torch.empty(0)

    @torch.no_grad()
    def eval_metrics(self, ev: dict[str, float], data, log) -> dict[str, float]:
        if getattr(data, "queries", None) is None:
            return {}
        images, labels = data.queries
        feats = self.embed_all(images)
        out: dict[str, float] = {}
        collapse = collapse_metrics(feats)
        out.update({k: float(collapse[k]) for k in ("normalized_std", "std_ratio", "effective_rank")})
        if self.warn_on_collapse and self._collapsing(out):
            log(f"warning: {collapse_warning(collapse, feats.shape[1])}")
        if data.bank is not None:
            bank = self.embed_all(data.bank[0])
            out["knn_accuracy"] = knn_accuracy(bank, data.bank[1], feats, labels, k=self.monitor.knn_k)
        if self.online_probe is not None:
            device = self.online_probe[1].weight.device
            with eval_mode(self.online_probe):
                pred = self.online_probe(feats.to(device)).argmax(dim=1).cpu()
            out["probe_accuracy"] = float((pred == labels).float().mean())
        return out

    min_batch: ClassVar[int] = 0  # global batch below which the method is known to struggle (0: none)

    @torch.no_grad()
    def begin(self, data, out_dir) -> str:
        """``views.png``: eight held-out images and the views this method trains on (and a
        warning when the global batch is below ``min_batch``)."""
        from lmssl.data.batches import to_device
        from lmssl.figures import plot_view_pairs

        if not data.eval_batches:
            return ""
        device = next(self.parameters()).device
        batch = to_device(data.eval_batches[0], device)
        views = self.view_images(batch)
        path = plot_view_pairs(batch["images"], views, self.vision.mean, self.vision.std, Path(out_dir) / "views.png",
                               f"{self.name}: held-out images and their training views")
        lines = [f"views: {path}"]
        world = int(os.environ.get("WORLD_SIZE", "1"))
        batch_size = self.micro_batch * self.grad_accum * world
        if batch_size < self.min_batch:
            lines.append(f"warning: {self.name} is known to degrade or collapse below a global batch of "
                         f"{self.min_batch} images; this run has {batch_size} (raise train.micro_batch_size or "
                         "train.grad_accum, or watch the collapse monitors)")
        return "\n".join(lines)


def vit_flops(backbone, size: int) -> float:
    """Training FLOPs (3x forward) of a :class:`~lmssl.models.VisionBackbone` on one
    ``size x size`` image: the core on ``1 + N`` tokens and the patch embedding."""
    from dataclasses import replace

    from lmssl.models.flops import transformer_flops_per_token

    n = (size // backbone.vision.patch_size) ** 2
    core = sum(p.numel() for p in backbone.core.parameters())
    return (1 + n) * transformer_flops_per_token(replace(backbone.cfg, vocab_size=0), core, 1 + n) \
        + 6.0 * n * backbone.patches.weight.numel()
