"""VICReg (Bardes, Ponce and LeCun, 2022): variance-invariance-covariance regularisation of
two views' embeddings; no negatives, no target network.

Backbone, then an expander (:class:`lmssl.models.heads.MLPHead`, 3 layers with batch norm
and ReLU; 8192 wide in the paper). The loss (:func:`lmssl.losses.vicreg_loss`) is
``vicreg.inv_weight`` x the mean squared distance between the two views' embeddings,
``vicreg.var_weight`` x a hinge keeping every dimension's standard deviation over the batch
above 1 (no collapse), and ``vicreg.cov_weight`` x the squared off-diagonal covariances
(no two dimensions say the same thing); 25 / 25 / 1 as in the paper. The variance and
covariance are statistics of the *global* batch: embeddings are gathered from every process
with the gradient-keeping all-gather, so 1 and N processes give the same loss and gradients
(tested with 2). Views: BYOL's (the authors' code; :func:`lmssl.data.views.vicreg_views`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmssl.errors import UserError
from lmssl.losses import vicreg_loss
from lmssl.models.heads import MLPHead
from lmssl.models.vision import image_backbone
from lmssl.objectives import register
from lmssl.objectives._image import ImageObjective


@dataclass
class VICRegConfig:
    """The ``vicreg:`` section of a recipe."""

    expander_dim: int = 1024  # expander hidden and output width (paper: 8192)
    expander_layers: int = 3  # linear layers in the expander (paper: 3)
    inv_weight: float = 25.0  # lambda: invariance (mean squared distance of the two views)
    var_weight: float = 25.0  # mu: variance hinge (std of every dimension >= 1)
    cov_weight: float = 1.0  # nu: off-diagonal covariance


@register
class VICReg(ImageObjective):
    """Two views -> backbone -> expander -> invariance + variance + covariance."""

    name = "vicreg"
    Config = VICRegConfig
    description = "variance-invariance-covariance regularisation of image views (VICReg)"
    loss_label = "loss (25 inv + 25 var + 1 cov)"
    recipe = "vicreg_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "vicreg.expander_dim=64")
    view_preset = "vicreg_views"
    min_batch = 128  # the variance and covariance are batch statistics

    def __init__(self, cfg) -> None:
        super().__init__(cfg, backbone=image_backbone(cfg.model, cfg.vision))
        c = cfg.vicreg
        self.vic = c
        self.expander = MLPHead(self.backbone.dim, c.expander_dim, c.expander_dim, c.expander_layers)

    @classmethod
    def validate_config(cls, cfg) -> None:
        c = cfg.vicreg
        if min(c.inv_weight, c.var_weight, c.cov_weight) < 0:
            raise UserError("vicreg.inv_weight, var_weight and cov_weight must be >= 0")
        if c.expander_layers < 1 or c.expander_dim < 2:
            raise UserError("vicreg.expander_layers must be at least 1 and vicreg.expander_dim at least 2")

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        v1, v2 = self.view_images(batch)  # (B, C, S, S) each
        h1, h2 = self.embed(v1), self.embed(v2)  # (B, D)
        c = self.vic
        loss, terms = vicreg_loss(self.expander(h1), self.expander(h2), c.inv_weight, c.var_weight, c.cov_weight,
                                  gather=True)
        probe_loss, probe_metrics = self.probe_step(h1, batch)
        return loss + probe_loss, {"loss": loss.detach(), **terms, **probe_metrics}

    def flops_per_sample(self) -> float:
        size = self.vision.image_size
        head = sum(p.numel() for p in self.expander.parameters())
        return 2 * (self.backbone_flops(size) + 6.0 * head)
