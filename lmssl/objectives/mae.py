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

``lmssl pretrain recipes/mae_cifar10.yaml`` trains it (images from
:mod:`lmssl.data.images`); from Python it is a module like the text objectives::

    cfg = load_config("recipes/mae_cifar10.yaml")
    mae = build(cfg)
    loss, metrics = mae({"pixel_values": images})  # images (B, 3, 32, 32), normalised
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from lmssl.config import MAEConfig, ModelConfig, VisionConfig
from lmssl.figures import plot_reconstructions
from lmssl.losses.pixel import patch_mse
from lmssl.masking import gather_tokens, num_kept, random_keep, restore_order
from lmssl.models.flops import transformer_flops_per_token
from lmssl.models.transformer import Transformer, eval_mode, init_weights
from lmssl.models.vision import VisionBackbone
from lmssl.nn import sincos_positions_2d, unpatchify

Batch = dict[str, torch.Tensor]


class MAE(nn.Module):
    """``batch["pixel_values"] (B, C, H, W)`` -> pixel MSE on the hidden patches.

    The batch may carry the mask as ``keep_idx (B, K)`` and ``restore_idx (B, N)``
    (:meth:`prepare_batch`); otherwise it is drawn in :meth:`forward` from a generator
    seeded by torch's global RNG (which the trainer seeds per step).
    """

    def __init__(self, cfg: ModelConfig, vision: VisionConfig, mae: MAEConfig) -> None:
        super().__init__()
        if not 0.0 < mae.mask_ratio < 1.0:
            raise ValueError(f"mae.mask_ratio must be in (0, 1), got {mae.mask_ratio}")
        self.cfg, self.vision, self.mae = cfg, vision, mae
        self.encoder = VisionBackbone(cfg, vision)
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
        keep_idx, restore_idx = self.draw_mask(batch["pixel_values"].shape[0], generator)
        return {**batch, "keep_idx": keep_idx, "restore_idx": restore_idx}

    def _mask(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if "keep_idx" in batch:
            return batch["keep_idx"], batch["restore_idx"]
        images = batch["pixel_values"]
        seed = int(torch.randint(2**62, ()))  # CPU draw: no device synchronisation
        return self.draw_mask(images.shape[0], torch.Generator(images.device).manual_seed(seed))

    def decode(self, images: torch.Tensor, keep_idx: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
        """Decoder output at every patch position: ``(B, N, decoder_dim)``."""
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
            y = self.decoder_embed(enc.encode(tokens + enc.positions.to(tokens.dtype)))  # (B, 1 + N, d)
            patches = y[:, 1:]
        seq = torch.cat([y[:, :1], patches + self.decoder_positions.to(y.dtype)], dim=1)  # (B, 1 + N, d)
        return self.decoder(seq, is_causal=False)[:, 1:]

    def forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["pixel_values"]
        keep_idx, restore_idx = self._mask(batch)
        h = self.decode(images, keep_idx, restore_idx)  # (B, N, d)
        hidden_idx = restore_idx.argsort(dim=1)[:, keep_idx.shape[1]:]  # (B, N - K) hidden positions
        pred = self.pred(gather_tokens(h, hidden_idx))  # (B, N - K, p*p*C): hidden patches only
        target = gather_tokens(self.encoder.patchify(images), hidden_idx)
        loss = patch_mse(pred, target, self.mae.norm_pix_loss)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def report(self, tokenizer, eval_batches: list[dict[str, torch.Tensor]], cfg, out_dir: Path) -> str:
        """The end-of-run picture: up to 8 held-out images, the patches the encoder saw, and
        the reconstructions, as ``out_dir/reconstructions.png``."""
        if not eval_batches:
            return "mae: no held-out images to reconstruct"
        device = next(self.parameters()).device
        images = torch.cat([b["pixel_values"] for b in eval_batches])[:8].to(device)
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


def build(cfg, tokenizer=None) -> MAE:
    """``cfg``: a :class:`~lmssl.config.RunConfig`; images need no tokenizer."""
    return MAE(cfg.model, cfg.vision, cfg.mae)
