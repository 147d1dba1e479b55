"""BYOL (Grill et al. 2020): predict the target network's embedding of one view from the
online network's embedding of the other; no negatives.

Online network: backbone, projector and predictor (:class:`lmssl.models.heads.MLPHead`,
linear, batch norm, ReLU, linear). Target network: backbone and projector only, an
exponential moving average of the online ones (:mod:`lmssl.models.ema`), updated after every
optimizer step through the ``after_step`` hook with BYOL's cosine momentum, from
``byol.base_momentum`` (0.996) to ``byol.final_momentum`` (1.0) over the run; not at all
after a step the trainer skipped. The target is a submodule that takes no gradient, so it is
in every checkpoint and a resumed run continues exactly.

Loss (:func:`lmssl.losses.byol_loss`): ``2 - 2 cos(q(z_online(v1)), z_target(v2))`` plus the
same with the views swapped, the targets detached, as in the paper (its range is [0, 8]).
The views are BYOL's asymmetric pair (:func:`lmssl.data.views.byol_views`).

Small batches: BYOL relies on the batch-norm layers of its heads and on the slowly moving
target; users report collapse at batch 32, and the paper's accuracy drops below 256
(``min_batch``: a warning at the start of a run below it). The collapse monitors say when it
happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmssl.errors import UserError
from lmssl.losses import byol_loss
from lmssl.models.ema import cosine_momentum, ema_copy, ema_update_
from lmssl.models.heads import MLPHead
from lmssl.models.vision import image_backbone
from lmssl.objectives import register
from lmssl.objectives._image import ImageObjective


@dataclass
class BYOLConfig:
    """The ``byol:`` section of a recipe."""

    proj_hidden: int = 1024  # projector and predictor hidden width (paper: 4096)
    proj_dim: int = 256  # projection width (paper: 256)
    base_momentum: float = 0.996  # target EMA momentum at step 0 (paper: 0.996; solo-learn CIFAR: 0.99)
    final_momentum: float = 1.0  # momentum at the last step (cosine schedule)


@register
class BYOL(ImageObjective):
    """Online (backbone, projector, predictor) regresses the EMA target's projection of the other view."""

    name = "byol"
    Config = BYOLConfig
    description = "self-distillation with an EMA target network (BYOL)"
    loss_label = "loss (2 - 2 cos, both directions)"
    recipe = "byol_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "byol.proj_hidden=64",
                       "byol.proj_dim=32")
    view_preset = "byol_views"
    min_batch = 256

    def __init__(self, cfg) -> None:
        super().__init__(cfg, backbone=image_backbone(cfg.model, cfg.vision))
        c = cfg.byol
        self.byol, self.max_steps = c, cfg.train.max_steps
        self.projector = MLPHead(self.backbone.dim, c.proj_hidden, c.proj_dim, 2)
        self.predictor = MLPHead(c.proj_dim, c.proj_hidden, c.proj_dim, 2)
        self.target_backbone = ema_copy(self.backbone)
        self.target_projector = ema_copy(self.projector)

    @classmethod
    def validate_config(cls, cfg) -> None:
        c = cfg.byol
        if not 0.0 <= c.base_momentum <= c.final_momentum <= 1.0:
            raise UserError(f"byol needs 0 <= base_momentum <= final_momentum <= 1, got {c.base_momentum} and "
                            f"{c.final_momentum}")

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        v1, v2 = self.view_images(batch)  # (B, C, S, S) each
        h1, h2 = self.embed(v1), self.embed(v2)  # (B, D)
        p1, p2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))  # (B, proj_dim)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone.pooled(v1, self.pool))
            t2 = self.target_projector(self.target_backbone.pooled(v2, self.pool))
        loss = byol_loss(p1, p2, t1, t2)
        probe_loss, probe_metrics = self.probe_step(h1, batch)
        return loss + probe_loss, {"loss": loss.detach(), **probe_metrics}

    def momentum(self, step: int) -> float:
        return cosine_momentum(step, self.max_steps, self.byol.base_momentum, self.byol.final_momentum)

    def after_step(self, step: int, skipped: torch.Tensor) -> None:
        """Move the target towards the online network (not after a skipped step)."""
        m = self.momentum(step)
        ema_update_(self.target_backbone, self.backbone, m, skipped)
        ema_update_(self.target_projector, self.projector, m, skipped)

    def flops_per_sample(self) -> float:
        """Two views: online backbone and heads forward and backward, target backbone and projector forward."""
        size = self.vision.image_size
        proj = sum(p.numel() for p in self.projector.parameters())
        pred = sum(p.numel() for p in self.predictor.parameters())
        online = self.backbone_flops(size) + 6.0 * (proj + pred)
        target = self.backbone_flops(size, backward=False) + 2.0 * proj
        return 2 * (online + target)
