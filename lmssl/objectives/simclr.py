"""SimCLR (Chen, Kornblith, Norouzi and Hinton, 2020): two augmented views of every image,
pulled together against every other view in the global batch.

Each image gets two views from one distribution (:func:`lmssl.data.views.simclr_views`:
random resized crop, flip, colour jitter, greyscale, and blur from 64 px up). The backbone
(the shared ViT by default, or ``model.preset=resnet18_cifar``) pools each view to ``h``;
an MLP projector (:class:`lmssl.models.heads.MLPHead`: linear, batch norm, ReLU, linear)
maps it to ``z``. The loss is NT-Xent (:func:`lmssl.losses.nt_xent`): each of the ``2N``
views must pick out its partner among the other ``2N - 1`` views of the batch, by cosine
similarity divided by ``simclr.temperature``, where ``N`` is the *global* batch: the
embeddings are gathered from every process with the gradient-keeping all-gather, so one
process and several give the same loss and gradients (tested with 2 processes).

The representation kept is ``h``, not ``z`` (the paper's finding: the projector discards
what the augmentations vary). ``features`` is ``h`` of the unaugmented image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmssl.errors import UserError
from lmssl.losses import nt_xent_with_accuracy
from lmssl.models.heads import MLPHead
from lmssl.models.vision import image_backbone
from lmssl.objectives import register
from lmssl.objectives._image import ImageObjective


@dataclass
class SimCLRConfig:
    """The ``simclr:`` section of a recipe."""

    temperature: float = 0.2  # NT-Xent temperature (paper: 0.5 on CIFAR-10 at batch 1024+, 0.1 on ImageNet; 0.2 at small batches)
    proj_hidden: int = 512  # projector hidden width (paper: 2048 for ResNet-50)
    proj_dim: int = 128  # projector output, the space the loss compares in (paper: 128)
    proj_layers: int = 2  # linear layers in the projector (SimCLR v1: 2; v2: 3)


@register
class SimCLR(ImageObjective):
    """Two views -> backbone -> projector -> NT-Xent over the global batch."""

    name = "simclr"
    Config = SimCLRConfig
    description = "contrastive learning of augmented image views (SimCLR, NT-Xent)"
    loss_label = "loss (NT-Xent, nats)"
    metric_names = {"accuracy": "positive ranked first"}
    recipe = "simclr_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "simclr.proj_hidden=64",
                       "simclr.proj_dim=32")
    view_preset = "simclr_views"
    min_batch = 256  # SimCLR's negatives come from the batch; the paper's accuracy falls steadily below ~1024

    def __init__(self, cfg) -> None:
        super().__init__(cfg, backbone=image_backbone(cfg.model, cfg.vision))
        c = cfg.simclr
        self.sim = c
        self.projector = MLPHead(self.backbone.dim, c.proj_hidden, c.proj_dim, c.proj_layers)

    @classmethod
    def validate_config(cls, cfg) -> None:
        c = cfg.simclr
        if not c.temperature > 0:
            raise UserError(f"simclr.temperature must be > 0, got {c.temperature}")
        if c.proj_layers < 1 or c.proj_hidden < 1 or c.proj_dim < 1:
            raise UserError("simclr.proj_layers, proj_hidden and proj_dim must be at least 1")

    def forward(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, accuracy, h1 = self.loss_on(*self.view_images(batch))
        probe_loss, probe_metrics = self.probe_step(h1, batch)
        return loss + probe_loss, {"loss": loss.detach(), "accuracy": accuracy, **probe_metrics}

    def loss_on(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Two normalised views ``(B, C, S, S)`` -> ``(NT-Xent, fraction of partners ranked first,
        backbone features of the first view (B, D))``."""
        h1, h2 = self.embed(v1), self.embed(v2)  # (B, D)
        z1, z2 = self.projector(h1), self.projector(h2)  # (B, proj_dim)
        loss, accuracy = nt_xent_with_accuracy(z1, z2, self.sim.temperature, gather=True)
        return loss, accuracy, h1

    def flops_per_sample(self) -> float:
        """Two views through backbone and projector (forward and backward), and the similarity matrix."""
        size, B = self.vision.image_size, self.micro_batch
        head = sum(p.numel() for p in self.projector.parameters())
        return 2 * (self.backbone_flops(size) + 6.0 * head) + 6.0 * 2 * (2 * B) * self.sim.proj_dim
