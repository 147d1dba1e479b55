"""What the classic pretext tasks share: labels made from the image itself, drawn per sample position.

Rotation (:mod:`lmssl.objectives.rotation`), jigsaw (:mod:`lmssl.objectives.jigsaw`) and relative patch
position (:mod:`lmssl.objectives.relative_position`) each transform an image in one of ``K`` ways and
train the backbone, with a small classifier, to say which. :class:`PretextObjective` owns the parts
that are the same for all three, so each method file holds only its transformation and its head:

- the views: a random resized crop of ``vision.crop_min_scale``-100% of the area and, with
  ``vision.hflip``, a left-right flip (:func:`pretext_views`; MAE's augmentation), cut on the device;
  held-out batches are scored on the plain images.
- the draws: :meth:`PretextObjective.prepare_batch` puts the method's per-sample draws (its
  ``draw(index)``: the label and any offsets, a dict of CPU tensors) in ``batch[name]``. They are a
  function of the sample's global position only (``batch["index"]``, hashed by
  :func:`lmssl.data.views.counter_uniform` in a stream of the method's own), like the views: the same
  image position gets the same label whatever the batch split, process count or resume. The generator
  the trainer passes is used only for a batch without positions.
- the loss: cross-entropy of the method's ``pretext_logits(images, draws) -> (logits (M, K), labels
  (M,))``, with the metrics ``loss``, ``accuracy`` (pretext accuracy) and ``chance`` (``1 / K``).
- the online probe: on the pooled backbone of the plain images, computed without gradient and only
  while the probe is on (the pretext inputs are rotated images or tiles, not the images the probe is
  scored on); its FLOPs are counted in :meth:`PretextObjective.probe_flops`.

The shared tensor helpers (:func:`cut_squares`, :func:`resize_squares`, :func:`draw_ints`) cut squares
at per-sample integer corners with one gather: batched, exact and with no host read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmssl.objectives import Batch
from lmssl.objectives._image import ImageObjective


def pretext_views(cfg):
    """The :class:`~lmssl.data.views.ViewTransform` of the pretext tasks: one view, a random resized crop
    of ``vision.crop_min_scale``-100% of the area, flipped half of the time when ``vision.hflip``."""
    from lmssl.data.views import ViewTransform, mae_views

    v = cfg.vision
    specs = mae_views(v.image_size, min_scale=v.crop_min_scale)
    for spec in specs:
        spec.hflip_p = 0.5 if v.hflip else 0.0
    return ViewTransform(specs, v.mean, v.std, cfg.train.seed)


def sample_positions(batch: Batch, generator: torch.Generator) -> torch.Tensor:
    """The batch's global sample positions ``batch["index"] (B,)``, or, for a batch without them,
    positions drawn from ``generator``."""
    if "index" in batch:
        return batch["index"]
    return torch.randint(0, 2**62, (batch["images"].shape[0],), generator=generator)


def draw_ints(u: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms ``u`` in [0, 1) -> integers uniform in ``0 .. n - 1`` (int64, same shape)."""
    return (u * n).to(torch.int64)


def cut_squares(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """``images (B, C, H, W)`` and the integer top-left corners ``top, left (B, K)`` of ``K`` squares per
    image -> the squares ``(B, K, C, size, size)``, copied exactly (one gather; every square must lie
    inside its image)."""
    B, C, H, W = images.shape
    K = top.shape[1]
    r = torch.arange(size, device=images.device)
    rows = top.to(images.device)[..., None] + r  # (B, K, size)
    cols = left.to(images.device)[..., None] + r
    idx = (rows[..., :, None] * W + cols[..., None, :]).reshape(B, K * size * size)  # flat source pixels
    out = images.flatten(2).gather(2, idx[:, None, :].expand(B, C, -1))  # (B, C, K * size * size)
    return out.view(B, C, K, size, size).transpose(1, 2)  # (B, K, C, size, size)


def resize_squares(squares: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, K, C, s, s) -> (B, K, C, size, size)``, bilinear (unchanged when ``s == size``)."""
    B, K, C, s = squares.shape[:4]
    if s == size:
        return squares
    flat = F.interpolate(squares.flatten(0, 1), size=(size, size), mode="bilinear", align_corners=False,
                         antialias=s > size)
    return flat.view(B, K, C, size, size)


class PretextObjective(ImageObjective):
    """Base of the ``K``-way pretext classifiers; subclasses define ``num_classes``, :meth:`draw` (from
    a counter stream of their own) and :meth:`pretext_logits` (see the module docstring)."""

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    @classmethod
    def make_views(cls, cfg):
        return pretext_views(cfg)

    def draw(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The draws of the samples at global positions ``index (B,)``: a dict of int64 tensors, ``label``
        among them."""
        raise NotImplementedError

    def pretext_logits(self, images: torch.Tensor, draws: dict[str, torch.Tensor]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``images (B, C, S, S)`` and their draws -> ``(logits (M, K), labels (M,))``."""
        raise NotImplementedError

    def prepare_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        """CPU side: the draws of every image, as ``batch[name]``."""
        return {**batch, self.name: self.draw(sample_positions(batch, generator))}

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: the pretext on the augmented view; eval: on the plain image."""
        if self.name not in batch:  # not prepared (a direct call): draw on the batch's own device
            batch = self.prepare_batch(batch, torch.Generator())
        images = self.view_images(batch)[0] if self.training else self.plain_images(batch)  # (B, C, S, S)
        logits, labels = self.pretext_logits(images, batch[self.name])
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        probe_loss, probe_metrics = self.probe_step(self._probe_features(batch), batch)
        return loss + probe_loss, {"loss": loss.detach(), "accuracy": accuracy,
                                   "chance": torch.full_like(accuracy, 1.0 / self.num_classes), **probe_metrics}

    def _probe_features(self, batch: Batch) -> torch.Tensor:
        """The plain images' features for the online probe, without gradient (nothing when it is off)."""
        if self.online_probe is None or "labels" not in batch:
            return torch.zeros(0, device=batch["images"].device)
        with torch.no_grad():
            return self.features(batch)

    def probe_flops(self) -> float:
        """The probe's forward pass over the plain image (0 when the probe is off)."""
        return self.backbone_flops(self.vision.image_size, backward=False) if self.online_probe is not None else 0.0
