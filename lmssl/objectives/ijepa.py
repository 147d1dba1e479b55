"""I-JEPA (Assran et al. 2023): predict the *representations* of hidden blocks of an image from a
visible context block, not their pixels.

Networks. Context encoder: a ViT (:class:`~lmssl.models.vision.VisionBackbone` built with
``cls_token=False``: I-JEPA's ViT has no class token, and the exported ``IJepaModel`` has none)
run on the context patches only, through keep indices as MAE's encoder runs on the visible
patches. Target encoder: an exponential moving average of the context encoder
(:func:`lmssl.models.ema.ema_copy`) run on the full image; its outputs are layer-normalised per
token (no affine parameters) to give the targets. The EMA momentum rises linearly from
``ijepa.base_momentum`` (0.996) to ``ijepa.final_momentum`` (1.0) over the run, as in the paper,
through ``after_step``, and stays put after a skipped step. Predictor: a narrow transformer (the
shared :class:`~lmssl.models.transformer.Transformer` with ``ijepa.predictor_dim``,
``predictor_layers``, ``predictor_heads``): the context encoder's tokens are projected to its width
and get its fixed 2-D sin-cos positions; for each target block separately it also gets one learned
mask token per target patch carrying that patch's position, and its outputs at the mask tokens,
projected back to the encoder's width, are the predictions.

Masks (:func:`lmssl.masking.jepa_masks`, on the CPU in :meth:`IJEPA.prepare_batch`): 4 target blocks
of scale (0.15, 0.2) and aspect ratio (0.75, 1.5) and one context block of scale (0.85, 1.0) and
aspect 1, the paper's ranges, with the targets removed from the context. Every sample of a batch
gets the same number of context patches (the smallest context of the batch, a random subset of the
larger ones; I-JEPA truncates to the minimum too) and target blocks of one size, so the batch
stacks without padding and the forward pass needs no host read. On the bundled 28-px images with
4-px patches the grid is 7 x 7 and a target block covers 6 to 12 patches; the sampler redraws
positions for a sample whose context would be empty and falls back to the whole grid minus the
targets, so a context always has at least ``ijepa.min_context`` patches.

Loss: smooth L1 (``ijepa.loss: smooth_l1``, the paper's code) or mean squared error (``mse``)
between predictions and targets, on the target patches only, averaged over patches and features.

Views: a random resized crop of 30-100% of the image (``ijepa.crop_min_scale``), no flip and no
colour augmentation (I-JEPA's point is that it needs none).

Features (k-NN, probe, collapse monitors, fine-tuning) are the mean of the target encoder's patch
states on the whole image, as the paper's linear probes average the last layer. The export maps the
target encoder onto ``transformers``' ``IJepaModel`` (no class token, learned position embeddings
that receive the sin-cos table, pre-norm blocks, a final LayerNorm), registered as ``("ijepa",
"vit")`` in :mod:`lmssl.export.transformers_map` with a parity check of its own.

Picture (``report``): the context (what the encoder saw) and the four target blocks over 8
held-out images, with each image's prediction error (``jepa_blocks.png``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmssl.errors import UserError
from lmssl.masking import gather_tokens, jepa_masks
from lmssl.models.ema import ema_copy, ema_update_
from lmssl.models.flops import transformer_flops_per_token
from lmssl.models.transformer import Transformer, eval_mode, init_weights
from lmssl.models.vision import VisionBackbone, xavier_patch_init_
from lmssl.nn import sincos_positions_2d
from lmssl.objectives import register
from lmssl.objectives._image import ImageObjective

Batch = dict[str, torch.Tensor]


@dataclass
class IJEPAConfig:
    """The ``ijepa:`` section of a recipe."""

    predictor_dim: int = 384  # predictor width (paper: 384 for every encoder size)
    predictor_layers: int = 12  # predictor blocks (paper: 12 for ViT-H, 6 for ViT-B)
    predictor_heads: int = 12  # predictor attention heads
    num_targets: int = 4  # target blocks per image (paper: 4)
    target_scale: list[float] = field(default_factory=lambda: [0.15, 0.2])  # area fraction of a target block
    target_aspect: list[float] = field(default_factory=lambda: [0.75, 1.5])  # height / width of a target block
    context_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])  # area fraction of the context block
    context_aspect: list[float] = field(default_factory=lambda: [1.0, 1.0])  # its height / width (paper: square)
    min_context: int = 1  # fewest context patches an image may keep (paper, at 14 x 14 patches: 10)
    loss: str = "smooth_l1"  # smooth_l1 (the paper's code) | mse
    base_momentum: float = 0.996  # target-encoder EMA momentum at step 0 (paper: 0.996)
    final_momentum: float = 1.0  # at the last step (linear schedule, as the paper)
    crop_min_scale: float = 0.3  # training crops cover 30-100% of the image (paper: 0.3)


def linear_momentum(step: int, max_steps: int, base: float, final: float) -> float:
    """I-JEPA's schedule: ``base + (final - base) * step / max_steps``, clipped to the run."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return base + (final - base) * progress


@register
class IJEPA(ImageObjective):
    """Context encoder + predictor regress the layer-normalised EMA target encoder's states of hidden blocks."""

    name = "ijepa"
    Config = IJEPAConfig
    description = "joint-embedding predictive architecture: predict the representations of hidden blocks (I-JEPA)"
    loss_label = "loss (smooth L1 on target-block representations)"
    pool = "mean"
    recipe = "ijepa_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "ijepa.predictor_dim=32",
                       "ijepa.predictor_layers=1", "ijepa.predictor_heads=4")

    def __init__(self, cfg) -> None:
        super().__init__(cfg, cfg.model.dim)
        c = self.ijepa = cfg.ijepa
        self.cfg, self.max_steps = cfg.model, cfg.train.max_steps
        self.encoder = VisionBackbone(cfg.model, cfg.vision, cls_token=False)
        xavier_patch_init_(self.encoder)  # before the EMA copy: both start from it
        self.target_encoder = ema_copy(self.encoder)
        self.predictor_cfg = replace(cfg.model, dim=c.predictor_dim, n_layers=c.predictor_layers,
                                     n_heads=c.predictor_heads, n_kv_heads=0, mlp_hidden=0)
        d = c.predictor_dim
        self.predictor_embed = nn.Linear(cfg.model.dim, d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.register_buffer("predictor_positions", sincos_positions_2d(*self.encoder.grid, d), persistent=False)
        self.predictor = Transformer(self.predictor_cfg)
        self.predictor_proj = nn.Linear(d, cfg.model.dim)
        init_weights(self.predictor, self.predictor_cfg)
        for linear in (self.predictor_embed, self.predictor_proj):
            nn.init.normal_(linear.weight, 0.0, cfg.model.init_std)
            nn.init.zeros_(linear.bias)
        nn.init.normal_(self.mask_token, 0.0, cfg.model.init_std)
        probe = self.draw_masks(64, torch.Generator().manual_seed(0))  # typical sizes, for the FLOP count
        self.typical_context, self.typical_target = probe.context_idx.shape[1], probe.target_idx.shape[2]

    @property
    def backbone(self) -> VisionBackbone:
        """The target encoder: what the monitors, the probe and the export read."""
        return self.target_encoder

    @classmethod
    def build(cls, cfg, tokenizer=None) -> IJEPA:
        return cls(cfg)

    @classmethod
    def validate_config(cls, cfg) -> None:
        c, v = cfg.ijepa, cfg.vision
        if cfg.model.family == "resnet":
            raise UserError("ijepa hides blocks of patches of a ViT; use a vit preset (model.preset=vit_tiny)")
        if c.predictor_dim % max(c.predictor_heads, 1):
            raise UserError(f"ijepa.predictor_dim={c.predictor_dim} must be divisible by "
                            f"ijepa.predictor_heads={c.predictor_heads}")
        if c.loss not in ("smooth_l1", "mse"):
            raise UserError(f"ijepa.loss must be smooth_l1 or mse, got '{c.loss}'")
        if not 0.0 <= c.base_momentum <= c.final_momentum <= 1.0:
            raise UserError(f"ijepa needs 0 <= base_momentum <= final_momentum <= 1, got {c.base_momentum} and "
                            f"{c.final_momentum}")
        if not 0.0 < c.crop_min_scale <= 1.0:
            raise UserError(f"ijepa.crop_min_scale must be in (0, 1], got {c.crop_min_scale}")
        grid = v.image_size // v.patch_size
        try:
            jepa_masks(grid, grid, 8, torch.Generator().manual_seed(0), **_mask_args(c))
        except (ValueError, TypeError) as e:
            raise UserError(f"ijepa masks on a {grid} x {grid} patch grid: {e}") from None

    @classmethod
    def make_views(cls, cfg):
        from lmssl.data.views import ViewSpec, ViewTransform

        v = cfg.vision
        return ViewTransform([ViewSpec(v.image_size, crop_scale=(cfg.ijepa.crop_min_scale, 1.0), hflip_p=0.0)],
                             v.mean, v.std, cfg.train.seed)

    # ------------------------------------------------------------------ masks

    def draw_masks(self, batch_size: int, generator: torch.Generator):
        """:class:`lmssl.masking.JepaMasks` for a batch, on the CPU."""
        return jepa_masks(*self.encoder.grid, batch_size, generator, **_mask_args(self.ijepa))

    def prepare_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        """CPU side: the context ``(B, Kc)`` and target ``(B, M, Kt)`` patch indices of every image."""
        masks = self.draw_masks(batch["images"].shape[0], generator)
        return {**batch, "context_idx": masks.context_idx, "target_idx": masks.target_idx}

    # ------------------------------------------------------------------ training

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: the loss on the batch's augmented view; eval: on the plain images (the
        masks come from :meth:`prepare_batch`). The online probe reads the target encoder's
        patch mean, computed anyway."""
        images = self.view_images(batch)[0] if self.training else self.plain_images(batch)
        loss, feats = self.loss_on(images, batch["context_idx"], batch["target_idx"])
        probe_loss, probe_metrics = self.probe_step(feats, batch)
        return loss + probe_loss, {"loss": loss.detach(), **probe_metrics}

    def loss_on(self, images: torch.Tensor, context_idx: torch.Tensor,
                target_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images (B, C, H, W)`` normalised, ``context_idx (B, Kc)``, ``target_idx (B, M, Kt)``
        -> ``(loss, target-encoder patch mean (B, dim))``."""
        pred, target, feats = self.predict_and_target(images, context_idx, target_idx)
        if self.ijepa.loss == "mse":
            loss = F.mse_loss(pred.float(), target)
        else:
            loss = F.smooth_l1_loss(pred.float(), target)
        return loss, feats

    def targets(self, images: torch.Tensor, target_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer-normalised target-encoder states of the target patches ``(B, M, Kt, dim)`` and
        the encoder's patch mean ``(B, dim)``, without gradient."""
        B, M, Kt = target_idx.shape
        with torch.no_grad():
            h = self.target_encoder(images)  # (B, N, dim): the full image
            feats = h.mean(dim=1)
            h = F.layer_norm(h.float(), (h.shape[-1],))  # per token, no affine parameters
            target = gather_tokens(h, target_idx.reshape(B, M * Kt)).view(B, M, Kt, -1)
        return target, feats

    def predict_and_target(self, images: torch.Tensor, context_idx: torch.Tensor,
                           target_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions and targets ``(B, M, Kt, dim)`` each, and the target encoder's patch mean."""
        target, feats = self.targets(images, target_idx)
        context = self.encoder(images, context_idx)  # (B, Kc, dim): the context patches only
        return self.predict(context, context_idx, target_idx), target, feats

    def predict(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        """Context states ``(B, Kc, dim)`` at ``context_idx (B, Kc)`` -> predictions ``(B, M, Kt, dim)``
        at ``target_idx (B, M, Kt)``: one predictor sequence per target block, its context tokens
        followed by a mask token at each of the block's positions."""
        B, Kc = context_idx.shape
        M, Kt = target_idx.shape[1:]
        pos = self.predictor_positions.to(context.dtype)  # (N, d)
        x = self.predictor_embed(context) + pos[context_idx]  # (B, Kc, d)
        x = x[:, None].expand(B, M, Kc, -1).reshape(B * M, Kc, -1)  # (B * M, Kc, d): the context, once per block
        queries = self.mask_token.to(x.dtype) + pos[target_idx.reshape(B * M, Kt)]  # (B * M, Kt, d)
        out = self.predictor(torch.cat([x, queries], dim=1), is_causal=False)[:, Kc:]  # (B * M, Kt, d)
        return self.predictor_proj(out).view(B, M, Kt, -1)

    def momentum(self, step: int) -> float:
        return linear_momentum(step, self.max_steps, self.ijepa.base_momentum, self.ijepa.final_momentum)

    def after_step(self, step: int, skipped: torch.Tensor) -> None:
        """Move the target encoder towards the context encoder (not after a skipped step)."""
        ema_update_(self.target_encoder, self.encoder, self.momentum(step), skipped)

    def flops_per_sample(self) -> float:
        """Training FLOPs per image for a typical mask: the context encoder on its patches
        (forward and backward), the target encoder on all patches (forward), the predictor on
        ``M`` sequences of context + target tokens (forward and backward)."""
        N, Kc, Kt, M = self.encoder.num_patches, self.typical_context, self.typical_target, self.ijepa.num_targets
        enc_params = sum(p.numel() for p in self.encoder.core.parameters())
        pred_params = sum(p.numel() for p in self.predictor.parameters())
        model = replace(self.cfg, vocab_size=0)
        context = Kc * transformer_flops_per_token(model, enc_params, Kc)
        target = N * transformer_flops_per_token(model, enc_params, N) / 3.0
        L = Kc + Kt
        pred = M * L * transformer_flops_per_token(replace(self.predictor_cfg, vocab_size=0), pred_params, L)
        patch = self.encoder.patches.weight.numel()
        linear = 6.0 * (Kc * patch + M * Kc * self.predictor_embed.weight.numel()
                        + M * Kt * self.predictor_proj.weight.numel()) + 2.0 * N * patch
        return context + target + pred + linear

    # ------------------------------------------------------------------ picture

    @torch.no_grad()
    def report(self, tokenizer, eval_batches: list[Batch], cfg, out_dir) -> str:
        """``jepa_blocks.png``: the context and the target blocks of 8 held-out images, with each
        image's prediction error."""
        from lmssl.figures import plot_jepa_blocks

        if not eval_batches:
            return "ijepa: no held-out images to draw the blocks on"
        device = next(self.parameters()).device
        raw = torch.cat([b["images"] for b in eval_batches])[:8]
        images = self.plain_images({"images": raw.to(device)})
        masks = self.draw_masks(len(raw), torch.Generator().manual_seed(self.views.seed))
        with eval_mode(self):
            pred, target, _ = self.predict_and_target(images, masks.context_idx.to(device), masks.target_idx.to(device))
        err = (pred.float() - target).abs().mean(dim=(1, 2, 3)).cpu()  # (B,) mean |error| per image
        N, p, (gh, gw) = self.encoder.num_patches, self.vision.patch_size, self.encoder.grid
        context = torch.zeros(len(raw), N, dtype=torch.bool).scatter_(1, masks.context_idx, True)
        M = masks.target_idx.shape[1]
        targets = torch.zeros(len(raw), M, N, dtype=torch.bool).scatter_(2, masks.target_idx, True)

        def pixels(m: torch.Tensor) -> torch.Tensor:  # (..., N) patches -> (..., H, W) pixels
            grid = m.view(*m.shape[:-1], gh, gw)
            return grid.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)

        path = plot_jepa_blocks(images, pixels(context), pixels(targets), self.vision.mean, self.vision.std,
                                Path(out_dir) / "jepa_blocks.png",
                                f"ijepa: context ({masks.context_idx.shape[1]} patches) and {M} target blocks "
                                f"({masks.target_idx.shape[2]} patches each); mean |error| per image",
                                predicted=err)
        return f"context and target blocks of {len(raw)} held-out images: {path}"


def _mask_args(c: IJEPAConfig) -> dict:
    return dict(num_targets=c.num_targets, target_scale=tuple(c.target_scale), target_aspect=tuple(c.target_aspect),
                context_scale=tuple(c.context_scale), context_aspect=tuple(c.context_aspect),
                min_context=c.min_context)
