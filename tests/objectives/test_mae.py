"""MAE: the same loss as ViTMAEForPreTraining given the same weights and noise, an encoder
that sees only the visible patches, training that lowers the loss, reconstructions, and the
patch and position helpers it is built from."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmssl.config import load_config
from lmssl.errors import UserError
from lmssl.export.transformers_map import NoExactTwin, vit_mae_pretraining
from lmssl.losses import normalize_patches, patch_mse
from lmssl.masking._common import uniform
from lmssl.nn import PatchEmbedding, patchify, sincos_positions_2d, unpatchify
from lmssl.objectives.mae import MAE
from lmssl.train.optim import make_optimizer

SMALL = ["model.preset=vit_tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4", "vision.image_size=32",
         "vision.patch_size=4", "mae.decoder_dim=32", "mae.decoder_layers=1", "mae.decoder_heads=4"]


def mae_cfg(*extra: str):
    return load_config(None, ["objective=mae"] + SMALL + list(extra))


def make_mae(*extra: str, seed: int = 0) -> MAE:
    torch.manual_seed(seed)
    return MAE.build(mae_cfg(*extra))


def simple_images(n: int, g: torch.Generator, size: int = 32) -> torch.Tensor:
    """A random colour plus a random left-to-right ramp per image: the hidden patches follow
    from the visible ones, so a working MAE learns them in a few dozen steps."""
    ramp = torch.linspace(-0.5, 0.5, size).expand(size, size)  # (H, W), varies along the width
    return torch.randn(n, 3, 1, 1, generator=g) + torch.randn(n, 1, 1, 1, generator=g) * ramp


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_vit_mae_for_pretraining(norm_pix):
    from transformers import ViTMAEForPreTraining

    m = make_mae(f"mae.norm_pix_loss={str(norm_pix).lower()}").eval()
    config, state = vit_mae_pretraining(m)
    ref = ViTMAEForPreTraining(config).eval()
    ref.load_state_dict(state, strict=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    # random_keep draws U[0, 1) noise from the generator exactly as ViTMAE's `noise` argument wants it
    noise = uniform((3, 64), torch.Generator().manual_seed(7), None)
    keep_idx, restore_idx = m.draw_mask(3, torch.Generator().manual_seed(7))
    ours, _, _ = m.loss_on(images, keep_idx, restore_idx)
    theirs = ref(pixel_values=images, noise=noise)
    assert ours.item() == pytest.approx(theirs.loss.item(), rel=1e-5)
    hidden = torch.ones(3, 64, dtype=torch.bool).scatter_(1, keep_idx, False)
    assert torch.equal(theirs.mask.bool(), hidden)


def test_encoder_runs_on_visible_patches_only():
    m = make_mae()
    seen = []
    m.encoder.core.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    m.loss_on(torch.randn(2, 3, 32, 32))
    assert seen == [torch.Size([2, 1 + 16, 64])]  # class token + 25% of 64 patches

    full = make_mae("mae.encoder_mask_token=true")
    seen.clear()
    full.encoder.core.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    full.loss_on(torch.randn(2, 3, 32, 32))
    assert seen == [torch.Size([2, 1 + 64, 64])]
    assert full.flops_per_image() > 2 * m.flops_per_image()
    with pytest.raises(NoExactTwin):
        vit_mae_pretraining(full)


@pytest.mark.parametrize("variant", [[], ["mae.encoder_mask_token=true"]], ids=["visible-only", "mask-token-encoder"])
def test_training_lowers_the_loss(variant):
    m = make_mae(*variant, "mae.norm_pix_loss=false")
    cfg = mae_cfg()
    cfg.optim.lr, cfg.optim.weight_decay = 1e-3, 0.0
    opt = make_optimizer(m, cfg.optim, "cpu")
    g = torch.Generator().manual_seed(0)
    eval_images = simple_images(32, torch.Generator().manual_seed(99))
    eval_mask = m.draw_mask(32, torch.Generator().manual_seed(3))

    def held_out() -> float:
        with torch.no_grad():
            return m.eval().loss_on(eval_images, *eval_mask)[0].item()

    before = held_out()
    m.train()
    for _ in range(100):
        loss, _, _ = m.loss_on(simple_images(16, g), *m.draw_mask(16, g))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = held_out()
    assert after < 0.7 * before, (before, after)


def test_mask_drawn_in_forward_follows_the_global_seed():
    m = make_mae()
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    a = m.loss_on(images)[0]
    torch.manual_seed(3)
    b = m.loss_on(images)[0]
    torch.manual_seed(4)
    c = m.loss_on(images)[0]
    assert a.item() == b.item() and a.item() != c.item()


def test_reconstruct_keeps_visible_patches_and_predicts_hidden_ones():
    m = make_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    out = m.reconstruct(images, torch.Generator().manual_seed(0))
    keep_idx, _ = m.draw_mask(2, torch.Generator().manual_seed(0))
    hidden = torch.ones(2, 64, dtype=torch.bool).scatter_(1, keep_idx, False)
    rec, masked, orig = patchify(out["reconstruction"], 4), patchify(out["masked"], 4), patchify(images, 4)
    assert torch.equal(rec[~hidden], orig[~hidden])
    assert torch.equal(masked[~hidden], orig[~hidden]) and bool((masked[hidden] == 0).all())
    assert not torch.allclose(rec[hidden], orig[hidden])


def test_wrong_image_size_is_one_clear_error():
    m = make_mae()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m.loss_on(torch.randn(2, 3, 30, 30))
    with pytest.raises(ValueError, match="1 channel"):
        MAE.build(mae_cfg("vision.channels=1", "vision.mean=[0.5]", "vision.std=[0.5]")).loss_on(torch.randn(2, 3, 32, 32))
    with pytest.raises(UserError, match="multiple of vision.patch_size"):
        mae_cfg("vision.image_size=30")
    with pytest.raises(UserError, match="mae.mask_ratio"):
        mae_cfg("mae.mask_ratio=1.0")


# --- the pieces: patches, 2-D positions, pixel loss


def test_patchify_round_trip_and_patch_embedding_is_a_strided_convolution():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 4)  # (2, 4 * 6, 48)
    assert patches.shape == (2, 24, 48)
    assert torch.equal(unpatchify(patches, 4, (4, 6), 3), images)
    emb = PatchEmbedding(4, 3, 8)
    conv = torch.nn.Conv2d(3, 8, 4, stride=4)
    with torch.no_grad():
        conv.weight.copy_(emb.weight.view(8, 4, 4, 3).permute(0, 3, 1, 2))
        conv.bias.copy_(emb.bias)
    torch.testing.assert_close(emb(patches), conv(images).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="whole number"):
        patchify(torch.randn(1, 3, 10, 10), 4)


def test_sincos_positions_2d_follow_mae_layout():
    """MAE's table (which its checkpoints and ViTMAE's hold): for the patch in row r, column c,
    ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with ``w_i = 10000^(-i / (dim / 4))``."""
    gh, gw, dim = 3, 5, 32
    w = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows = []
    for r in range(gh):
        for c in range(gw):
            rows.append(torch.cat([torch.sin(c * w), torch.cos(c * w), torch.sin(r * w), torch.cos(r * w)]))
    torch.testing.assert_close(sincos_positions_2d(gh, gw, dim), torch.stack(rows).float(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_positions_2d(2, 2, 6)


def test_patch_mse():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 5, 12, generator=g), torch.randn(4, 5, 12, generator=g) * 3 + 1
    assert patch_mse(pred, target).item() == pytest.approx(F.mse_loss(pred, target).item(), rel=1e-6)
    t = normalize_patches(target)
    torch.testing.assert_close(t.mean(-1), torch.zeros(4, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(4, 5), atol=1e-4, rtol=0)
    assert patch_mse(pred, target, normalize_target=True).item() == pytest.approx(F.mse_loss(pred, t).item(), rel=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        patch_mse(pred, target[:, :4])


# --- through `lmssl pretrain`'s loop, on a folder of images


def test_pretrain_mae_on_an_image_folder_then_resume(tmp_path):
    from lmssl.train.log import read_log
    from lmssl.runs import load_run
    from lmssl.train.loop import train
    from tests.data.test_images import write_images

    write_images(tmp_path / "imgs", 64, size=(32, 32))
    out = tmp_path / "run"
    args = SMALL + ["objective=mae", f"data.train_files={tmp_path / 'imgs'}", f"train.output_dir={out}",
                    "data.validation_fraction=0.25", "train.micro_batch_size=16", "train.max_steps=60",
                    "train.eval_every=30", "train.save_every=30", "train.log_every=1", "train.progress=false",
                    "optim.lr=3e-3", "optim.warmup_steps=5", "optim.weight_decay=0", "mae.norm_pix_loss=false"]
    result = train(load_config(None, args))
    rows = [r for r in read_log(out / "log.jsonl") if r.get("kind") != "eval"]
    assert [r["step"] for r in rows] == list(range(1, 61))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert all(k in rows[-1] for k in ("images_per_s", "images_seen", "mfu", "tflops"))
    assert rows[-1]["images_seen"] == 60 * 16
    assert result["eval_loss"] < 0.7 * first
    assert (out / "reconstructions.png").stat().st_size > 5000 and "reconstructions.png" in result["report"]
    assert (out / "loss_curve.png").exists()

    model, cfg, tokenizer = load_run(out)
    assert isinstance(model, MAE) and tokenizer is None and cfg.vision.image_size == 32

    more = train(load_config(None, args + ["train.max_steps=70"]))  # resumes at step 60
    assert more["step"] == 70
    rows = [r for r in read_log(out / "log.jsonl") if r.get("kind") != "eval"]
    assert [r["step"] for r in rows] == list(range(1, 71))


def test_shipped_cifar10_recipe_runs_on_a_local_folder(tmp_path, capsys):
    """The recipe as shipped, through the `lmssl pretrain` command, with its Hub dataset
    swapped for local images (no network here)."""
    from lmssl.cli import main
    from tests.conftest import ROOT
    from tests.data.test_images import write_images

    write_images(tmp_path / "imgs", 24, size=(36, 36))
    recipe = ROOT / "recipes" / "mae_cifar10.yaml"
    overrides = ["data.dataset=", f"data.train_files={tmp_path / 'imgs'}", "data.validation_fraction=0.25",
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.micro_batch_size=4",
                 "train.progress=false"]
    cfg = load_config(recipe, overrides)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.mae.decoder_dim) == (32, 4, 128)
    assert main(["pretrain", str(recipe), *overrides]) == 0
    out = capsys.readouterr().out
    assert "step 2, 8 images seen" in out and "images/s (last window)" in out and "reconstructions.png" in out
    metrics = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert math.isfinite(metrics["eval_loss"]) and metrics["images_seen"] == 8
