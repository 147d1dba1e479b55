"""The ViT's initialisation settings: the sin-cos table's scale (also for other image sizes),
the class token's spread and the residual projections' std, each against the default."""

from __future__ import annotations

import math

import torch

from lmssl.config import load_config
from lmssl.models.vision import VisionBackbone
from lmssl.nn import sincos_positions_2d

BASE = ["model.preset=vit_tiny", "model.dim=64", "model.n_layers=4", "model.n_heads=4", "vision.image_size=28",
        "vision.patch_size=4", "vision.channels=1", "vision.mean=[0.5]", "vision.std=[0.5]"]


def backbone(*extra: str) -> VisionBackbone:
    cfg = load_config(None, BASE + list(extra))
    torch.manual_seed(0)
    return VisionBackbone(cfg.model, cfg.vision)


def test_position_scale_scales_the_table_at_the_training_size_and_at_other_sizes():
    plain, scaled = backbone(), backbone("vision.position_scale=0.04")
    torch.testing.assert_close(plain.positions, sincos_positions_2d(7, 7, 64))
    torch.testing.assert_close(scaled.positions, 0.04 * plain.positions)
    torch.testing.assert_close(scaled.positions_for(12, 12), 0.04 * plain.positions_for(12, 12))  # a DINO local crop
    images = torch.randn(2, 1, 28, 28)
    patches = plain.patches(plain.patchify(images))  # the same patch weights (same seed): only the table differs
    torch.testing.assert_close(scaled.embed(images) - patches, scaled.positions.expand(2, -1, -1))


def test_class_token_and_residual_projections_follow_their_settings():
    default = backbone()
    dino = backbone("vision.cls_init_std=1e-6", "model.scale_residual_init=false")
    assert 0.01 < default.cls.std().item() < 0.03 and dino.cls.abs().max().item() < 1e-5
    for name, std in (("attn.proj", 0.02 / math.sqrt(8)), ("mlp.fc2", 0.02 / math.sqrt(8))):
        w_default = dict(default.named_parameters())[f"core.blocks.0.{name}.weight"]
        w_dino = dict(dino.named_parameters())[f"core.blocks.0.{name}.weight"]
        assert abs(w_default.std().item() - std) < 0.2 * std  # GPT-2's 1 / sqrt(2 n_layers), 4 layers
        assert abs(w_dino.std().item() - 0.02) < 0.2 * 0.02  # unscaled, as ViTModel and DINO start
