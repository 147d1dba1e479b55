"""Colourisation (Zhang, Isola and Efros, 2016): predict the colours of an image from its lightness.

The formulation: Zhang et al.'s classification over quantised colours
----------------------------------------------------------------------
Each RGB view is converted to CIE Lab (:func:`kornia.color.rgb_to_lab`, D65). The backbone sees only
the lightness: the image with its colour removed, ``Lab -> (L, 0, 0) -> RGB``, a neutral grey of the
same lightness in the three channels the backbone has (normalised as every input is), so the exported
backbone is an ordinary 3-channel ViT. It predicts the two colour channels ``ab``:

- at a quarter of the input resolution, as the paper does: one colour per ``colorization.stride`` =
  4 pixels a side, the mean ``ab`` of those pixels. With the ViT's 4-pixel patches that is one
  colour per patch token; a smaller stride gives each token ``(patch / stride) ** 2`` colours.
- as a distribution over the ``Q`` bins of a ``colorization.bin_size`` = 10 grid of the ab plane
  (:func:`ab_bins`: the bins some sRGB colour falls in, 261 at size 10), from a light decoder over the
  patch tokens (:class:`lmssl.models.heads.MLPHead`, per token; one linear layer by default, like
  MAE's pixel head).
- trained with cross-entropy against a soft encoding of the true colour: each target spread over its
  ``colorization.neighbours`` = 5 nearest bins with Gaussian weights (``sigma`` = 5), the paper's.

Why this and not a regression of RGB or ab: colour is multimodal (a shirt may be red or blue), and a
squared-error regression answers with the mean of the modes, a desaturated brown-grey (the paper's
argument for classifying); the bin classifier can keep several modes, and costs one linear layer over
the tokens. Zhang et al.'s class rebalancing (weighting rare, saturated colours up by the inverse of a
smoothed colour prior of the training set) is left out: it needs that prior, a pass over the training
set, before training starts. The loss is the unweighted soft cross-entropy, so the pictures come out
less saturated than the paper's.

Metrics: ``accuracy``, the fraction of predicted cells whose most likely bin is the true colour's
nearest bin, and ``chance``, the accuracy of always answering the batch's most frequent bin (mostly
the greys: the baseline a colouriser must beat; uniform guessing, ``1 / Q``, would flatter it).

Shortcuts: the input carries lightness only, and ``L`` is a function of the luminance alone, so no
colour is left in it to copy; the targets are computed from the same view the input is made from, so
augmentation (crop, flip: :func:`lmssl.objectives._pretext.pretext_views`; no colour jitter) changes
both alike.

``features`` is the mean of the patch tokens of the *lightness* of the plain image, the input this
backbone was trained on (the paper also evaluates its features on L); the class token is not trained
by the per-token head, so ``pool`` is ``mean``. The online probe reads the patch-token mean of the
training step. The end-of-run picture ``colorization.png`` shows held-out images, their lightness and
the colours predicted with the paper's annealed mean (``colorization.temperature`` = 0.38).

RGB data only: the bundled Fashion-MNIST set is greyscale (``vision.channels=1`` is refused in one
line); ``recipes/colorization_cifar10.yaml`` reads CIFAR-10 from the Hub, and
``data.dataset='' data.train_files=path/to/folder`` reads your own colour images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmssl.errors import UserError
from lmssl.models import eval_mode
from lmssl.models.heads import MLPHead
from lmssl.models.vision import VisionBackbone
from lmssl.objectives import Batch, register
from lmssl.objectives._image import ImageObjective


@dataclass
class ColorizationConfig:
    """The ``colorization:`` section of a recipe."""

    bin_size: float = 10.0  # side of the ab quantisation cells, Lab units (paper: 10)
    stride: int = 4  # one predicted colour per stride x stride pixels (paper: 1/4 of the input); divides vision.patch_size
    neighbours: int = 5  # soft encoding: each target colour spread over its nearest bins (paper: 5)
    sigma: float = 5.0  # width of the soft encoding's Gaussian weights, ab units (paper: 5)
    temperature: float = 0.38  # annealed mean of the predicted distribution, for the pictures (paper: 0.38)
    head_hidden: int = 512  # hidden width of the decoder when head_layers > 1
    head_layers: int = 1  # linear layers of the per-token decoder (1: one linear map, like MAE's pixel head)


def ab_bins(bin_size: float) -> torch.Tensor:
    """Centres ``(Q, 2)`` (a, b) of the ``bin_size`` grid cells of the ab plane that some sRGB colour
    falls in (nearest centre, over a 64^3 lattice of the sRGB cube): the classes of the colour classifier.
    About half a second on a CPU; computed at every build, not cached, so that every build makes the
    same host reads (the table is read back once to find the distinct cells)."""
    from kornia.color import rgb_to_lab

    s = torch.linspace(0.0, 1.0, 64)
    rgb = torch.stack(torch.meshgrid(s, s, s, indexing="ij")).reshape(3, 1, -1)  # 64^3 sRGB colours
    ab = rgb_to_lab(rgb)[1:, 0].T.numpy()  # (64^3, 2)
    cells = np.unique(np.round(ab / bin_size), axis=0)  # (Q, 2) grid indices, sorted
    return torch.from_numpy(cells * bin_size).float()


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, k: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Target colours ``ab (..., 2)`` -> their ``k`` nearest bins ``(..., k)`` int64 (nearest first) and
    Gaussian weights ``(..., k)`` summing to 1 (``exp(-d^2 / 2 sigma^2)``, normalised)."""
    d2 = (ab[..., None, :] - bins).pow(2).sum(-1)  # (..., Q)
    near, idx = d2.topk(k, dim=-1, largest=False)  # ascending distances
    return idx, torch.softmax(-near / (2.0 * sigma * sigma), dim=-1)


def to_cells(ab: torch.Tensor, stride: int, patch: int) -> torch.Tensor:
    """``ab (B, 2, S, S)`` -> the mean colour of every ``stride`` cell, in token order: ``(B, N, c * c, 2)``
    with ``N`` patches in reading order and ``c = patch / stride`` cells a side in each, reading order."""
    B = ab.shape[0]
    cells = F.avg_pool2d(ab, stride) if stride > 1 else ab  # (B, 2, G * c, G * c)
    c = patch // stride
    G = cells.shape[-1] // c
    return cells.view(B, 2, G, c, G, c).permute(0, 2, 4, 3, 5, 1).reshape(B, G * G, c * c, 2)


def from_cells(cells: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`to_cells`'s layout: ``(B, N, c * c, 2)`` -> ``(B, 2, G * c, G * c)``."""
    B, N, cc, _ = cells.shape
    c, G = patch // stride, round(N ** 0.5)
    return cells.view(B, G, G, c, c, 2).permute(0, 5, 1, 3, 2, 4).reshape(B, 2, G * c, G * c)


@register
class Colorization(ImageObjective):
    """RGB view -> Lab -> lightness into the ViT -> per-token decoder -> soft cross-entropy over ab bins."""

    name = "colorization"
    Config = ColorizationConfig
    description = "predicting an image's colours (quantised ab of Lab) from its lightness (Zhang et al.)"
    loss_label = "loss (soft cross-entropy over ab colour bins)"
    metric_names = {"accuracy": "colour-bin accuracy (pretext)", "chance": "most frequent colour bin (baseline)"}
    pool = "mean"
    warn_on_collapse = False  # a per-cell prediction cannot collapse to a constant; mean-pooled tokens share a direction
    recipe = "colorization_cifar10"
    # the recipe reads CIFAR-10 from the Hub; the smoke run reads the bundled images as RGB instead
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "data.dataset=",
                       "vision.image_column=image", "vision.image_size=28")

    def __init__(self, cfg) -> None:
        super().__init__(cfg, backbone=VisionBackbone(cfg.model, cfg.vision))
        c = cfg.colorization
        self.col = c
        self.register_buffer("bins", ab_bins(c.bin_size))  # (Q, 2), kept with the run
        self.cells = (cfg.vision.patch_size // c.stride) ** 2  # colours per token
        self.head = MLPHead(cfg.model.dim, c.head_hidden, self.cells * len(self.bins), c.head_layers, batch_norm=False)
        self.register_buffer("rgb_mean", torch.tensor(cfg.vision.mean)[:, None, None], persistent=False)
        self.register_buffer("rgb_std", torch.tensor(cfg.vision.std)[:, None, None], persistent=False)

    @classmethod
    def validate_config(cls, cfg) -> None:
        c, v = cfg.colorization, cfg.vision
        if v.channels != 3:
            raise UserError(f"colorization needs RGB images (vision.channels=3), got vision.channels={v.channels}: the "
                            "bundled Fashion-MNIST set is greyscale; use recipes/colorization_cifar10.yaml or colour "
                            "images in data.train_files")
        if cfg.model.family == "resnet":
            raise UserError("colorization decodes colours from a ViT's patch tokens; use a vit preset "
                            "(model.preset=vit_tiny), not a ResNet")
        if c.stride < 1 or v.patch_size % c.stride:
            raise UserError(f"colorization.stride={c.stride} must divide vision.patch_size={v.patch_size} "
                            "(one colour per stride x stride pixels, a whole number per patch)")
        if not (c.bin_size > 0 and c.sigma > 0 and c.temperature > 0):
            raise UserError("colorization.bin_size, sigma and temperature must be > 0")
        if c.neighbours < 1 or c.head_layers < 1 or c.head_hidden < 1:
            raise UserError("colorization.neighbours, head_layers and head_hidden must be at least 1")

    @classmethod
    def make_views(cls, cfg):
        from lmssl.objectives._pretext import pretext_views

        return pretext_views(cfg)

    # ------------------------------------------------------------------ inputs and targets

    def lab(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised RGB ``images (B, 3, S, S)`` -> Lab ``(B, 3, S, S)`` (L in 0..100, a and b about -110..110)."""
        from kornia.color import rgb_to_lab

        return rgb_to_lab((images.float() * self.rgb_std + self.rgb_mean).clamp(0.0, 1.0))

    def lightness_input(self, lab: torch.Tensor) -> torch.Tensor:
        """Lab ``(B, 3, S, S)`` -> what the backbone sees: the neutral grey of the same lightness, ``Lab (L, 0,
        0)`` in RGB, normalised: ``(B, 3, S, S)``."""
        from kornia.color import lab_to_rgb

        L = lab[:, :1]
        grey = lab_to_rgb(torch.cat([L, torch.zeros_like(L), torch.zeros_like(L)], dim=1))  # R = G = B up to ~1e-4
        return (grey.mean(dim=1, keepdim=True).expand_as(lab) - self.rgb_mean) / self.rgb_std

    def features(self, batch: Batch) -> torch.Tensor:
        """Mean patch token of the plain image's lightness (the input the backbone was trained on): ``(B, D)``."""
        return self.embed(self.lightness_input(self.lab(self.plain_images(batch))))

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, N, D)`` -> colour-bin logits ``(B, N, cells, Q)``."""
        B, N, _ = tokens.shape
        return self.head(tokens.reshape(B * N, -1)).view(B, N, self.cells, len(self.bins))

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: the augmented view's colours; eval: the plain image's."""
        images = self.view_images(batch)[0] if self.training else self.plain_images(batch)  # (B, 3, S, S)
        lab = self.lab(images)
        tokens = self.backbone(self.lightness_input(lab))[:, 1:]  # (B, N, D)
        logits = self.logits(tokens).float()  # (B, N, cells, Q)
        target = to_cells(lab[:, 1:], self.col.stride, self.vision.patch_size)  # (B, N, cells, 2)
        idx, weight = soft_encode(target, self.bins, min(self.col.neighbours, len(self.bins)), self.col.sigma)
        loss = -(weight * logits.log_softmax(dim=-1).gather(-1, idx)).sum(-1).mean()
        nearest = idx[..., 0]  # (B, N, cells): the true colour's bin
        accuracy = (logits.argmax(dim=-1) == nearest).float().mean()
        counts = torch.zeros(len(self.bins), device=logits.device).scatter_add_(
            0, nearest.reshape(-1), torch.ones(nearest.numel(), device=logits.device))
        chance = counts.max() / nearest.numel()  # always answering the batch's most frequent bin
        probe_loss, probe_metrics = self.probe_step(tokens.mean(dim=1), batch)
        return loss + probe_loss, {"loss": loss.detach(), "accuracy": accuracy, "chance": chance, **probe_metrics}

    @torch.no_grad()
    def colorize(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised RGB ``images (B, 3, S, S)`` -> ``lightness`` (the backbone's input) and ``colorized``
        (that lightness with the predicted colours: the annealed mean of the bins, upsampled), both
        normalised ``(B, 3, S, S)``."""
        from kornia.color import lab_to_rgb

        lab = self.lab(images)
        grey = self.lightness_input(lab)
        logits = self.logits(self.backbone(grey)[:, 1:]).float()  # (B, N, cells, Q)
        probs = torch.softmax(logits / self.col.temperature, dim=-1)
        ab = from_cells(probs @ self.bins, self.vision.patch_size, self.col.stride)  # (B, 2, G*c, G*c)
        ab = F.interpolate(ab, size=images.shape[-2:], mode="bilinear", align_corners=False)
        rgb = lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1))
        return {"lightness": grey, "colorized": (rgb - self.rgb_mean) / self.rgb_std}

    @torch.no_grad()
    def begin(self, data, out_dir) -> str:
        """The views picture, and a warning when the held-out images have no colour (R = G = B)."""
        lines = [super().begin(data, out_dir)]
        if data.eval_batches:
            x = data.eval_batches[0]["images"]
            if bool((x == x[:, :1]).all()):
                lines.append("warning: the images are greyscale (R = G = B everywhere): colorization has no colour to "
                             "learn; point the recipe at colour images (recipes/colorization_cifar10.yaml)")
        return "\n".join(line for line in lines if line)

    @torch.no_grad()
    def report(self, tokenizer, eval_batches: list[Batch], cfg, out_dir) -> str:
        """``colorization.png``: up to 8 held-out images, their lightness, and the predicted colours."""
        from lmssl.figures import plot_view_pairs

        if not eval_batches:
            return "colorization: no held-out images to colour"
        device = next(self.parameters()).device
        images = torch.cat([b["images"] for b in eval_batches])[:8].to(device)
        with eval_mode(self):
            pictures = self.colorize(self.plain_images({"images": images}))
        path = plot_view_pairs(images, [pictures["lightness"], pictures["colorized"]], self.vision.mean,
                               self.vision.std, Path(out_dir) / "colorization.png",
                               "colorization: held-out images, their lightness (the input), predicted colours")
        return f"colourised {len(images)} held-out images: {path}"

    def flops_per_sample(self) -> float:
        """The backbone on the lightness and the decoder on every patch token (forward and backward)."""
        head = sum(p.numel() for p in self.head.parameters())
        return self.backbone_flops(self.vision.image_size) + 6.0 * self.backbone.num_patches * head
