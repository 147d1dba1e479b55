"""Masked autoencoder (MAE): hide most patches of an image, reconstruct their pixels.

The encoder (:class:`~lmssl.models.vision.VisionBackbone`, a ViT) runs on the visible
patches only, about a quarter of them, which is what makes MAE cheap. A narrower decoder
(the same :class:`~lmssl.models.transformer.Transformer`, with its own width and depth)
gets the encoded visible patches back in image order with a learned mask token at every
hidden position, and a linear layer predicts the pixels of the hidden patches. The loss
is the mean squared error on hidden patches only, against per-patch normalised pixels
when ``mae.norm_pix_loss`` (:func:`lmssl.losses.patch_mse`).

Which patches are hidden comes from the shared masking core
(:func:`lmssl.masking.random_keep`): per-image uniform noise, sorted. With
``mae.encoder_mask_token`` the encoder instead sees every patch, hidden ones replaced by
a learned mask token (the ablation in the MAE paper, and the "full-sequence encoder" that
``lmssl bench mae`` compares against).

``ViTMAEForPreTraining`` computes the same function: given the same weights and the
same noise it returns the same loss (``tests/objectives/test_mae.py``).

Training images get MAE's augmentation (:func:`lmssl.data.views.mae_views`: a random
resized crop of ``vision.crop_min_scale``-100% of the area and a left-right flip), cut on
the device; held-out images are scored unaugmented.

``lmssl pretrain recipes/mae_tiny.yaml`` trains it on the bundled images; from Python it
is a module like the text objectives::

    cfg = load_config("recipes/mae_tiny.yaml")
    mae = lmssl.objectives.build(cfg, None)
    loss, metrics = mae.loss_on(images)  # images (B, 1, 28, 28), normalised
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from lmssl.errors import UserError
from lmssl.figures import plot_reconstructions
from lmssl.losses.pixel import patch_mse
from lmssl.masking import gather_tokens, num_kept, random_keep, restore_order
from lmssl.models.flops import transformer_flops_per_token
from lmssl.models.transformer import Transformer, eval_mode, init_weights
from lmssl.models.vision import VisionBackbone
from lmssl.nn import sincos_positions_2d, unpatchify
from lmssl.objectives import register
from lmssl.objectives._image import ImageObjective

Batch = dict[str, torch.Tensor]


@dataclass
class MAEConfig:
    """The ``mae:`` section of a recipe."""

    mask_ratio: float = 0.75  # fraction of patches hidden from the encoder
    decoder_dim: int = 512  # width of the (narrower) decoder
    decoder_layers: int = 8  # decoder blocks
    decoder_heads: int = 16  # decoder attention heads
    norm_pix_loss: bool = True  # regress each patch's pixels normalised by its own mean and variance
    encoder_mask_token: bool = False  # True: the encoder sees every patch, hidden ones as a mask token (MAE's slower ablation)


@register
class MAE(ImageObjective):
    """``batch["images"]`` -> pixel MSE on the hidden patches of its (augmented) view.

    The batch may carry the mask as ``keep_idx (B, K)`` and ``restore_idx (B, N)``
    (:meth:`prepare_batch`); otherwise it is drawn in :meth:`forward` from a generator
    seeded by torch's global RNG (which the trainer seeds per step).
    """

    name = "mae"
    Config = MAEConfig
    description = "masked autoencoding of image patches (MAE)"
    loss_label = "loss (pixel MSE on hidden patches)"
    pool = "mean"
    warn_on_collapse = False
    recipe = "mae_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "mae.decoder_dim=32",
                       "mae.decoder_layers=1", "mae.decoder_heads=4")

    def __init__(self, cfg, model_cfg=None, vision=None, mae: MAEConfig | None = None) -> None:
        model_cfg, vision, mae = model_cfg or cfg.model, vision or cfg.vision, mae or cfg.mae
        super().__init__(cfg, model_cfg.dim)
        if not 0.0 < mae.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in (0, 1), got {mae.mask_ratio}")
        self.cfg, self.vision, self.mae = model_cfg, vision, mae
        self.encoder = VisionBackbone(model_cfg, vision)
        cfg = model_cfg
        self.decoder_cfg = replace(cfg, dim=mae.decoder_dim, n_layers=mae.decoder_layers, n_heads=mae.decoder_heads,
                                   n_kv_heads=0, mlp_hidden=0)
        d, patch_pixels = mae.decoder_dim, vision.patch_size ** 2 * vision.channels
        self.decoder_embed = nn.Linear(cfg.dim, d)
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.register_buffer("decoder_positions", sincos_positions_2d(*self.encoder.grid, d), persistent=False)
        self.decoder = Transformer(self.decoder_cfg)
        self.pred = nn.Linear(d, patch_pixels)
        self.encoder_mask_token = nn.Parameter(torch.zeros(cfg.dim)) if mae.encoder_mask_token else None
        init_weights(self.decoder, self.decoder_cfg)
        for linear in (self.decoder_embed, self.pred):
            nn.init.normal_(linear.weight, 0.0, cfg.init_std)
            nn.init.zeros_(linear.bias)
        for token in (self.mask_token, self.encoder_mask_token):
            if token is not None:
                nn.init.normal_(token, 0.0, cfg.init_std)

    @classmethod
    def validate_config(cls, cfg) -> None:
        if cfg.model.family == "resnet":
            raise UserError("mae hides patches of a ViT; use a vit preset (model.preset=vit_tiny), not a ResNet")
        m = cfg.mae
        if not 0.0 < m.mask_ratio < 1.0:
            raise UserError(f"mae.mask_ratio must be in (0, 1), got {m.mask_ratio}")
        if m.decoder_dim % max(m.decoder_heads, 1):
            raise UserError(f"mae.decoder_dim={m.decoder_dim} must be divisible by mae.decoder_heads={m.decoder_heads}")

    @classmethod
    def build(cls, cfg, tokenizer=None) -> MAE:
        return cls(cfg)

    @classmethod
    def make_views(cls, cfg):
        from lmssl.data.views import ViewTransform, mae_views

        v = cfg.vision
        specs = mae_views(v.image_size, min_scale=v.crop_min_scale)
        for spec in specs:
            spec.hflip_p = 0.5 if v.hflip else 0.0
        return ViewTransform(specs, v.mean, v.std, cfg.train.seed)

    @property
    def backbone(self) -> VisionBackbone:
        return self.encoder

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the encoder's patch states with every patch visible: ``(B, dim)``."""
        return self.encoder.pooled(images, self.pool)

    @property
    def num_kept(self) -> int:
        return num_kept(self.encoder.num_patches, mask_ratio=self.mae.mask_ratio)

    def draw_mask(self, batch_size: int, generator: torch.Generator,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keep_idx (B, K), restore_idx (B, N))`` for a batch of images."""
        keep_idx, _, restore_idx = random_keep(batch_size, self.encoder.num_patches, generator,
                                               mask_ratio=self.mae.mask_ratio, device=device)
        return keep_idx, restore_idx

    def prepare_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        """CPU side: draw the mask of every image in the batch."""
        keep_idx, restore_idx = self.draw_mask(batch["images"].shape[0], generator)
        return {**batch, "keep_idx": keep_idx, "restore_idx": restore_idx}

    def _mask(self, batch: Batch, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if "keep_idx" in batch:
            return batch["keep_idx"], batch["restore_idx"]
        seed = int(torch.randint(2**62, ()))  # CPU draw: no device synchronisation
        return self.draw_mask(images.shape[0], torch.Generator(images.device).manual_seed(seed))

    def decode(self, images: torch.Tensor, keep_idx: torch.Tensor, restore_idx: torch.Tensor,
               with_latent: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decoder output at every patch position: ``(B, N, decoder_dim)`` (and, with
        ``with_latent``, the encoder states ``(B, 1 + K or 1 + N, dim)``)."""
        B, N, K = images.shape[0], self.encoder.num_patches, keep_idx.shape[1]
        if self.encoder_mask_token is None:
            latent = self.encoder(images, keep_idx)  # (B, 1 + K, dim): visible patches only
            y = self.decoder_embed(latent)  # (B, 1 + K, d)
            fill = self.mask_token.to(y.dtype).expand(B, N - K, -1)  # (B, N - K, d)
            patches = restore_order(torch.cat([y[:, 1:], fill], dim=1), restore_idx)  # (B, N, d), image order
        else:
            enc = self.encoder
            tokens = enc.patches(enc.patchify(images))  # (B, N, dim)
            hidden = hidden_mask(keep_idx, N)  # (B, N)
            tokens = torch.where(hidden[..., None], self.encoder_mask_token.to(tokens.dtype), tokens)
            latent = enc.encode(tokens + enc.positions.to(tokens.dtype))  # (B, 1 + N, dim)
            y = self.decoder_embed(latent)  # (B, 1 + N, d)
            patches = y[:, 1:]
        seq = torch.cat([y[:, :1], patches + self.decoder_positions.to(y.dtype)], dim=1)  # (B, 1 + N, d)
        out = self.decoder(seq, is_causal=False)[:, 1:]
        return (out, latent) if with_latent else out

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training: the loss on the batch's augmented view, plus the online probe's on the
        mean of the visible patches' encoder states; eval: the loss on the plain images."""
        images = self.view_images(batch)[0] if self.training else self.plain_images(batch)
        loss, metrics, latent = self.loss_on(images, *self._mask(batch, images))
        probe_loss, probe_metrics = self.probe_step(latent[:, 1:].mean(dim=1), batch)
        return loss + probe_loss, {**metrics, **probe_metrics}

    def loss_on(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None,
                restore_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """``images (B, C, H, W)`` normalised -> ``(loss, metrics, encoder states (B, 1 + K, dim))``;
        without a mask one is drawn from torch's global RNG."""
        if keep_idx is None:
            keep_idx, restore_idx = self._mask({}, images)
        h, latent = self.decode(images, keep_idx, restore_idx, with_latent=True)  # (B, N, d)
        hidden_idx = restore_idx.argsort(dim=1)[:, keep_idx.shape[1]:]  # (B, N - K) hidden positions
        pred = self.pred(gather_tokens(h, hidden_idx))  # (B, N - K, p*p*C): hidden patches only
        target = gather_tokens(self.encoder.patchify(images), hidden_idx)
        loss = patch_mse(pred, target, self.mae.norm_pix_loss)
        return loss, {"loss": loss.detach()}, latent

    @torch.no_grad()
    def report(self, tokenizer, eval_batches: list[dict[str, torch.Tensor]], cfg, out_dir: Path) -> str:
        """The end-of-run picture: up to 8 held-out images, the patches the encoder saw, and
        the reconstructions, as ``out_dir/reconstructions.png``."""
        if not eval_batches:
            return "mae: no held-out images to reconstruct"
        device = next(self.parameters()).device
        images = self.plain_images({"images": torch.cat([b["images"] for b in eval_batches])[:8].to(device)})
        with eval_mode(self):
            pictures = self.reconstruct(images, torch.Generator(device).manual_seed(cfg.train.seed))
        path = plot_reconstructions(images, pictures["hidden"], pictures["reconstruction"], self.vision.mean,
                                    self.vision.std, Path(out_dir) / "reconstructions.png",
                                    "mae: held-out images, visible patches, reconstruction")
        return f"reconstructions of {len(images)} held-out images: {path}"

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """For pictures: ``masked`` input (hidden patches zeroed), ``reconstruction`` (visible
        patches from the input, hidden ones predicted, de-normalised with each true patch's
        mean and variance when ``norm_pix_loss``), both ``(B, C, H, W)``, and ``hidden``
        ``(B, 1, H, W)`` bool, True on the pixels of hidden patches."""
        keep_idx, restore_idx = self.draw_mask(images.shape[0], generator, images.device)
        patches = self.encoder.patchify(images)  # (B, N, P)
        pred = self.pred(self.decode(images, keep_idx, restore_idx)).float()  # (B, N, P)
        if self.mae.norm_pix_loss:
            mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        hidden = hidden_mask(keep_idx, patches.shape[1])  # (B, N)
        grid, p, C = self.encoder.grid, self.vision.patch_size, self.vision.channels
        masked = patches.masked_fill(hidden[..., None], 0.0)
        mixed = torch.where(hidden[..., None], pred.to(patches.dtype), patches)
        hidden_pixels = unpatchify(hidden[..., None].expand_as(patches).to(patches.dtype), p, grid, C)[:, :1] > 0
        return {"masked": unpatchify(masked, p, grid, C), "reconstruction": unpatchify(mixed, p, grid, C),
                "hidden": hidden_pixels}

    def flops_per_sample(self) -> float:
        return self.flops_per_image()

    def flops_per_image(self) -> float:
        """Training FLOPs per image (3x forward): encoder on its tokens, decoder on all
        patches, the patch embedding on the patches it embeds, the prediction on hidden ones."""
        N, K = self.encoder.num_patches, self.num_kept
        seen = N if self.encoder_mask_token is not None else K
        enc_params = sum(p.numel() for p in self.encoder.core.parameters())
        dec_params = sum(p.numel() for p in self.decoder.parameters())
        enc = (1 + seen) * transformer_flops_per_token(replace(self.cfg, vocab_size=0), enc_params, 1 + seen)
        dec = (1 + N) * transformer_flops_per_token(replace(self.decoder_cfg, vocab_size=0), dec_params, 1 + N)
        linear = (seen * self.encoder.patches.weight.numel() + (1 + seen) * self.decoder_embed.weight.numel()
                  + (N - K) * self.pred.weight.numel())
        return enc + dec + 6.0 * linear


def hidden_mask(keep_idx: torch.Tensor, length: int) -> torch.Tensor:
    """``keep_idx (B, K)`` -> ``(B, length)`` bool, True at the positions not kept."""
    mask = torch.ones(keep_idx.shape[0], length, dtype=torch.bool, device=keep_idx.device)
    return mask.scatter_(1, keep_idx, False)
