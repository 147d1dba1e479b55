"""Relative patch position (Doersch, Gupta and Efros, 2015): given a centre patch and one of its eight
neighbours, say which neighbour it is.

The pair
--------
A 3 x 3 layout of square patches of ``relative_position.patch`` pixels, ``relative_position.gap``
pixels apart, is placed at a uniformly drawn position of each image's augmented view (a random
resized crop of ``vision.crop_min_scale``-100% of the area and a flip, :func:`lmssl.data.views.mae_views`),
so that the whole layout fits whatever the label; the first patch is the layout's centre, the second
one of its eight neighbours, numbered in reading order (0 top-left, 1 top, 2 top-right, 3 left,
4 right, 5 bottom-left, 6 bottom, 7 bottom-right), drawn uniformly, and each patch is moved by its own
jitter of up to ``relative_position.jitter`` pixels each way. Both patches go through the shared
backbone (resized to ``relative_position.input_size`` first), the two pooled features are
concatenated (centre first) and a classifier (:class:`lmssl.models.heads.MLPHead`) predicts the
neighbour, with cross-entropy over 8 classes (chance 12.5%). The paper: 96-pixel patches with a
48-pixel gap and up to 7 pixels of jitter; here, for 28-px images, 6-pixel patches with a 3-pixel gap
(the same half-a-patch ratio) and 1 pixel of jitter, the layout 26 pixels wide, each patch resized to
8 pixels (two 4 x 4 ViT patches a side).

Shortcuts, and how each is blocked
----------------------------------
- Edge continuity and shared boundary pixels (lines that continue from one patch into the other, the
  paper's main worry): the gap leaves ``gap - 2 * jitter`` to ``gap + 2 * jitter`` pixels between the
  two patches (here 1 to 5, never touching: :meth:`RelativePosition.validate_config` refuses a layout
  whose patches could overlap).
- Exact alignment (a straight edge that passes through both patches at the same height or column gives
  the direction away): each patch is jittered on its own in both directions, so the two are not on a
  common row or column grid.
- Where the patch came from: the layout is placed so that every neighbour fits, so the position of the
  centre patch in the image says nothing about the label; each patch is fed to the backbone alone with
  the same position table, so the network knows nothing of a patch but its content.
- Chromatic aberration (lenses shift colours towards the image edges, which told the paper's network
  where a patch lay, countered there by projecting out or dropping colour channels) is irrelevant on
  greyscale images such as the bundled set: there is only one channel to shift. The paper also
  downsampled some patches to counter pixelation cues; the resize to ``input_size`` applies one
  resampling to every patch alike instead.

The draws (neighbour, layout position, both jitters) are made on the CPU in ``prepare_batch`` from a
counter keyed by the sample's global position (:func:`lmssl.data.views.counter_uniform`), so they do not
depend on the batch split, the process count or a resume; the cutting is one batched gather in
``forward``, with no host read. Held-out batches are scored on the plain images. ``features`` is the
pooled backbone on the whole plain image; the online probe reads the same, without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmssl.data.views import counter_uniform
from lmssl.errors import UserError
from lmssl.models.heads import MLPHead
from lmssl.models.vision import image_backbone
from lmssl.objectives import register
from lmssl.objectives._pretext import PretextObjective, cut_squares, draw_ints, resize_squares

STREAM = 0x52454C  # counter stream of the pair draws ("REL"; the views use streams 0, 1, ...)
# (row, column) of each neighbour in the 3 x 3 layout, label order (reading order without the centre)
NEIGHBOURS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))


@dataclass
class RelativePositionConfig:
    """The ``relative_position:`` section of a recipe."""

    patch: int = 6  # side of each patch cut from the view, pixels (paper: 96)
    gap: int = 3  # pixels between neighbouring cells of the 3 x 3 layout (paper: 48, half a patch)
    jitter: int = 1  # each patch moves by up to this many pixels each way, on its own (paper: 7)
    input_size: int = 8  # patches are resized to this side for the backbone (a multiple of vision.patch_size; 0: patch)
    head_hidden: int = 512  # hidden width of the position classifier
    head_layers: int = 2  # linear layers of the classifier over the two concatenated features


@register
class RelativePosition(PretextObjective):
    """Augmented view -> centre patch and one neighbour (gap, jitter) -> shared backbone on each ->
    concatenated features -> 8-way classifier."""

    name = "relative_position"
    Config = RelativePositionConfig
    description = "predicting which of its eight neighbours a patch is, given the centre patch (Doersch et al.)"
    loss_label = "loss (cross-entropy, 8 neighbours)"
    metric_names = {"accuracy": "relative-position accuracy (pretext)", "chance": "relative-position chance (8-way)"}
    recipe = "relpos_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "relative_position.head_layers=1")

    def __init__(self, cfg) -> None:
        super().__init__(cfg, backbone=image_backbone(cfg.model, cfg.vision))
        backbone = self.backbone
        self.rp, self.seed = cfg.relative_position, cfg.train.seed
        self.head = MLPHead(2 * backbone.dim, self.rp.head_hidden, len(NEIGHBOURS), self.rp.head_layers)

    @property
    def num_classes(self) -> int:
        return len(NEIGHBOURS)

    @staticmethod
    def extent(rp: RelativePositionConfig) -> int:
        """Pixels the jittered 3 x 3 layout spans: ``3 * patch + 2 * gap + 2 * jitter``."""
        return 3 * rp.patch + 2 * rp.gap + 2 * rp.jitter

    @classmethod
    def validate_config(cls, cfg) -> None:
        rp, v = cfg.relative_position, cfg.vision
        if rp.patch < 1 or rp.gap < 0 or rp.jitter < 0:
            raise UserError(f"relative_position.patch must be >= 1, and its gap and jitter >= 0; got {rp.patch}, "
                            f"{rp.gap}, {rp.jitter}")
        if rp.gap < 2 * rp.jitter:
            raise UserError(f"relative_position.gap={rp.gap} is below twice relative_position.jitter={rp.jitter}: "
                            "jittered neighbours could overlap and share pixels; raise the gap or lower the jitter")
        if cls.extent(rp) > v.image_size:
            raise UserError(f"the 3 x 3 layout of relative_position.patch={rp.patch}, gap={rp.gap}, jitter={rp.jitter} "
                            f"spans {cls.extent(rp)} pixels, more than vision.image_size={v.image_size}: make them "
                            "smaller")
        size = rp.input_size or rp.patch
        if cfg.model.family != "resnet" and size % v.patch_size:
            raise UserError(f"patches enter the ViT at relative_position.input_size={size} pixels, not a multiple of "
                            f"vision.patch_size={v.patch_size}: set relative_position.input_size to one")
        if rp.head_layers < 1 or rp.head_hidden < 1:
            raise UserError("relative_position.head_layers and relative_position.head_hidden must be at least 1")

    def draw(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The pairs of the samples at global positions ``index (B,)``: ``label (B,)`` (the neighbour),
        ``top, left (B, 2)`` (top-left corners of the centre patch, then the neighbour), int64."""
        rp = self.rp
        u = counter_uniform(self.seed, index, STREAM, 7)  # (B, 7)
        label = draw_ints(u[:, 0], len(NEIGHBOURS))
        origin = draw_ints(u[:, 1:3], self.vision.image_size - self.extent(rp) + 1) + rp.jitter  # (B, 2) y, x
        jitter = draw_ints(u[:, 3:7], 2 * rp.jitter + 1).view(-1, 2, 2) - rp.jitter  # (B, pair, y/x)
        cells = torch.tensor(NEIGHBOURS, device=label.device)[label]  # (B, 2): the neighbour's row, column
        step = rp.patch + rp.gap
        centre = origin + step  # (B, 2): cell (1, 1)
        neighbour = origin + cells * step
        corners = torch.stack([centre, neighbour], dim=1) + jitter  # (B, 2, 2): pair, (y, x)
        return {"label": label, "top": corners[..., 0], "left": corners[..., 1]}

    def pretext_logits(self, images: torch.Tensor, draws: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        patches = cut_squares(images, draws["top"], draws["left"], self.rp.patch)  # (B, 2, C, p, p)
        patches = resize_squares(patches, self.rp.input_size or self.rp.patch)
        B = patches.shape[0]
        h = self.embed(patches.flatten(0, 1))  # (B * 2, D): each patch alone through the shared backbone
        return self.head(h.reshape(B, -1)), draws["label"]  # (B, 2 * D) -> (B, 8)

    def flops_per_sample(self) -> float:
        """Two patches through the backbone, the classifier (forward and backward), and the probe's forward
        pass over the plain image when it is on."""
        head = sum(p.numel() for p in self.head.parameters())
        return 2 * self.backbone_flops(self.rp.input_size or self.rp.patch) + 6.0 * head + self.probe_flops()
