"""RotNet (Gidaris, Singh and Komodakis, 2018): recognise which of four rotations, 0, 90, 180 or 270
degrees, an image was turned by.

Each training image gets its augmented view (:func:`lmssl.data.views.mae_views`: a random resized crop
of ``vision.crop_min_scale``-100% of the area and, with ``vision.hflip``, a left-right flip), then is
turned by a multiple of 90 degrees. The shared backbone (the ViT by default, or any
``model.family``) pools the turned image to ``h``; a small classifier
(:class:`lmssl.models.heads.MLPHead`) predicts the rotation, trained with cross-entropy. To name the
rotation the network has to know which way up the objects are: where heads, soles, collars and
handles sit.

The labels
----------
Each image's rotation is a function of its global sample position only (``batch["index"]``, hashed by
:func:`lmssl.data.views.counter_uniform` like the views' parameters), drawn on the CPU in
:meth:`Rotation.prepare_batch`: the same image position gets the same rotation whatever the batch it
lands in, the number of processes, or a resume. ``rotation.rotations_per_image`` copies of each image
are trained at once, with the rotations ``(r0 + j) mod 4`` for ``j < R`` and ``r0`` drawn uniformly:
1 (the default) is one random rotation per image; 4 is the paper's setting, all four rotated copies of
every image in the same batch (better in the paper's ablation, at four times the compute per image).
Every class is equally likely either way, so chance is 25%.

Shortcuts
---------
Multiples of 90 degrees are chosen because they are exact pixel permutations of a square image: no
interpolation, no empty corners, no resampling pattern that a network could read the angle from (the
paper's argument against arbitrary angles). The turn is applied after the crop and resize, so the
resampling of the crop is the same for every label; the crop's aspect ratio is log-uniform in
``(3/4, 4/3)``, symmetric about 1, so whether the content is stretched across or along carries no
information about the rotation either. What is left is the image content: the orientation of the
objects.

The turn is one batched gather on the device (an index table per rotation, picked per sample), with no
host read. Held-out batches are scored on the plain (unaugmented) images, with rotations drawn at their
own (negative) positions. ``features`` is the pooled backbone on the plain image; the online probe reads
that too, computed without gradient only while the probe is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmssl.data.views import counter_uniform
from lmssl.errors import UserError
from lmssl.models.heads import MLPHead
from lmssl.models.vision import image_backbone
from lmssl.objectives import register
from lmssl.objectives._pretext import PretextObjective, draw_ints

STREAM = 0x524F54  # counter stream of the rotation draws ("ROT"; the views use streams 0, 1, ...)


@dataclass
class RotationConfig:
    """The ``rotation:`` section of a recipe."""

    rotations_per_image: int = 1  # rotated copies of each image per step: 1 (a random turn) to 4 (all four: the paper)
    head_hidden: int = 512  # hidden width of the rotation classifier
    head_layers: int = 2  # linear layers of the classifier (1: linear on the pooled features)


def draw_rotations(seed: int, index: torch.Tensor, copies: int) -> torch.Tensor:
    """Rotation labels of the samples at global positions ``index (B,)`` -> ``(B, copies)`` int64 in
    ``0..3`` (quarter turns counter-clockwise): ``(r0 + j) mod 4`` with ``r0`` uniform per position."""
    r0 = draw_ints(counter_uniform(seed, index, STREAM, 1)[:, 0], 4)  # (B,)
    return (r0[:, None] + torch.arange(copies, device=r0.device)) % 4  # (B, copies)


def rotate_quarter_turns(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """``images (B, C, S, S)`` turned by ``turns (B,)`` quarter turns counter-clockwise each (as
    ``torch.rot90(x, k, dims=(2, 3))``) -> ``(B, C, S, S)``: one gather through four index tables."""
    B, C, H, W = images.shape
    if H != W:
        raise ValueError(f"quarter turns need square images, got {H}x{W}")
    grid = torch.arange(H * W, device=images.device).view(H, W)
    tables = torch.stack([torch.rot90(grid, k, dims=(0, 1)).reshape(-1) for k in range(4)])  # (4, S*S)
    idx = tables[turns.to(images.device)]  # (B, S*S): the source pixel of every output pixel
    return images.flatten(2).gather(2, idx[:, None, :].expand(B, C, -1)).view(B, C, H, W)


@register
class Rotation(PretextObjective):
    """Augmented view -> quarter turn -> backbone -> 4-way classifier (cross-entropy)."""

    name = "rotation"
    Config = RotationConfig
    description = "predicting which of four rotations an image was turned by (RotNet)"
    loss_label = "loss (cross-entropy, 4 rotations)"
    metric_names = {"accuracy": "rotation accuracy (pretext)", "chance": "rotation chance (4-way)"}
    recipe = "rotation_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "rotation.head_hidden=64")

    def __init__(self, cfg) -> None:
        super().__init__(cfg, backbone=image_backbone(cfg.model, cfg.vision))
        backbone = self.backbone
        self.rot, self.seed = cfg.rotation, cfg.train.seed
        self.head = MLPHead(backbone.dim, self.rot.head_hidden, 4, self.rot.head_layers)

    @property
    def num_classes(self) -> int:
        return 4

    @classmethod
    def validate_config(cls, cfg) -> None:
        r = cfg.rotation
        if not 1 <= r.rotations_per_image <= 4:
            raise UserError(f"rotation.rotations_per_image must be 1 to 4 (4: all four turns of every image), "
                            f"got {r.rotations_per_image}")
        if r.head_layers < 1 or r.head_hidden < 1:
            raise UserError("rotation.head_layers and rotation.head_hidden must be at least 1")

    def draw(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """``label (B, R)``: the quarter turns of each image's ``R`` copies."""
        return {"label": draw_rotations(self.seed, index, self.rot.rotations_per_image)}

    def pretext_logits(self, images: torch.Tensor, draws: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        labels = draws["label"].to(images.device)  # (B, R)
        R = labels.shape[1]
        copies = images.repeat_interleave(R, dim=0) if R > 1 else images  # (B * R, C, S, S)
        turned = rotate_quarter_turns(copies, labels.reshape(-1))
        return self.head(self.embed(turned)), labels.reshape(-1)  # (B * R, 4), (B * R,)

    def flops_per_sample(self) -> float:
        """``R`` turned copies through backbone and classifier (forward and backward), and the probe's
        forward pass over the plain image when it is on."""
        head = sum(p.numel() for p in self.head.parameters())
        return self.rot.rotations_per_image * (self.backbone_flops(self.vision.image_size) + 6.0 * head) \
            + self.probe_flops()
