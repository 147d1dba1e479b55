"""I-JEPA: what the context encoder and the predictor see (forward hooks), the layer-normalised
targets and the loss on the target patches only, the target encoder's EMA, and the export to
stock ``IJepaModel`` with its parity check. The trainer, resume and host-read checks are the
conformance tests (``tests/objectives/test_conformance.py -k ijepa``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmssl import objectives
from lmssl.config import load_config
from lmssl.masking import gather_tokens
from lmssl.models.vision import VisionBackbone
from tests.conftest import ROOT

SMALL = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "ijepa.predictor_dim=16", "ijepa.predictor_layers=1",
         "ijepa.predictor_heads=2", "train.max_steps=10"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny models on a shared 2-core host (a 2-thread pool waits for time slices)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_ijepa(*extra: str):
    cfg = load_config(ROOT / "recipes" / "ijepa_tiny.yaml", SMALL + list(extra))
    objectives.get("ijepa").validate_config(cfg)
    torch.manual_seed(0)
    return objectives.build(cfg, None), cfg


def prepared_batch(model, n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    index = torch.arange(n) + 1000 * seed
    batch = {"images": images, "index": index, "views": model.views.draw(index, (28, 28))}
    return model.prepare_batch(batch, torch.Generator().manual_seed(seed))


def test_backbone_without_class_token():
    model, cfg = small_ijepa()
    enc = model.encoder
    assert isinstance(enc, VisionBackbone) and enc.cls is None and enc.prefix == 0
    images = torch.randn(2, 1, 28, 28)
    assert enc(images).shape == (2, 49, 32) and enc(images, torch.tensor([[0, 5], [3, 48]])).shape == (2, 2, 32)
    torch.testing.assert_close(enc.pooled(images, "mean"), enc(images).mean(dim=1))
    with pytest.raises(ValueError, match="no class token"):
        enc.pooled(images, "cls")
    assert VisionBackbone(cfg.model, cfg.vision).prefix == 1  # the default keeps its class token


def test_encoder_sees_context_patches_and_predictor_sees_context_plus_mask_tokens_only():
    model, cfg = small_ijepa()
    model.train()
    batch = prepared_batch(model)
    ctx, tgt = batch["context_idx"], batch["target_idx"]
    B, Kc = ctx.shape
    M, Kt = tgt.shape[1:]
    seen = {}
    hooks = [model.encoder.core.register_forward_pre_hook(lambda m, a: seen.__setitem__("encoder", a[0])),
             model.target_encoder.core.register_forward_pre_hook(lambda m, a: seen.__setitem__("target", a[0])),
             model.predictor.register_forward_pre_hook(lambda m, a: seen.__setitem__("predictor", a[0]))]
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
    assert seen["encoder"].shape == (B, Kc, 32)  # the context patches only, no class token
    assert seen["target"].shape == (B, 49, 32)  # the target encoder sees the whole image
    x = seen["predictor"]
    assert x.shape == (B * M, Kc + Kt, 16)  # one sequence per target block: context tokens, then mask tokens
    pos = model.predictor_positions
    # the last Kt rows are the mask token at each target patch's position, nothing of the image
    queries = (model.mask_token + pos[tgt.reshape(B * M, Kt)]).detach()
    torch.testing.assert_close(x[:, Kc:], queries)
    # the first Kc rows are the context encoder's states, projected, at the context positions, the same for every block
    with torch.no_grad():
        context = model.encoder(model.view_images(batch)[0], ctx)
        expected = model.predictor_embed(context) + pos[ctx]  # (B, Kc, d)
    torch.testing.assert_close(x[:, :Kc].view(B, M, Kc, 16), expected[:, None].expand(B, M, Kc, 16))


@pytest.mark.parametrize("kind", ["smooth_l1", "mse"])
def test_loss_is_on_the_layer_normalised_target_patches_only(kind):
    model, _ = small_ijepa(f"ijepa.loss={kind}")
    model.eval()
    batch = prepared_batch(model, seed=1)
    images = model.plain_images(batch)
    ctx, tgt = batch["context_idx"], batch["target_idx"]
    B, M, Kt = tgt.shape
    with torch.no_grad():
        h = model.target_encoder(images)  # (B, N, dim)
        normed = F.layer_norm(h, (32,))
        assert torch.allclose(normed.mean(-1), torch.zeros(B, 49), atol=1e-5)
        target = torch.stack([gather_tokens(normed, tgt[:, m]) for m in range(M)], dim=1)  # (B, M, Kt, dim)
        pred = model.predict(model.encoder(images, ctx), ctx, tgt)
        expected = F.mse_loss(pred, target) if kind == "mse" else F.smooth_l1_loss(pred, target)
        _, metrics = model(batch)
    torch.testing.assert_close(metrics["loss"], expected)


def test_target_encoder_gets_no_gradient_and_follows_the_linear_ema_except_after_a_skipped_step():
    model, _ = small_ijepa()
    loss, _ = model(prepared_batch(model))
    loss.backward()
    target, online = list(model.target_encoder.parameters()), list(model.encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in target)
    assert all(p.grad is not None for p in online)
    assert model.predictor_proj.weight.grad is not None and model.mask_token.grad is not None
    with torch.no_grad():
        for p in online:
            p.add_(0.01 * torch.randn_like(p))
    before = [p.detach().clone() for p in target]
    m = model.momentum(5)
    assert m == pytest.approx(0.996 + 0.004 * 5 / 10)  # linear in the step
    model.after_step(5, torch.ones(()))
    assert all(torch.equal(a, b) for a, b in zip(before, target))
    model.after_step(5, torch.zeros(()))
    for old, new, o in zip(before, target, online):
        torch.testing.assert_close(new, m * old + (1 - m) * o.detach(), rtol=1e-5, atol=1e-7)


def test_export_to_ijepa_model_matches(tmp_path):
    import transformers

    from lmssl.export.core import _save_image_processor, build_model
    from lmssl.export.transformers_map import find_converter

    model, cfg = small_ijepa()
    with torch.no_grad():  # a target encoder that differs from its initialisation
        for p in model.target_encoder.parameters():
            p.add_(0.02 * torch.randn_like(p))
    conv = find_converter(cfg)(model, cfg, None)
    assert conv.model_class is transformers.IJepaModel
    hf = build_model(conv)
    hf.save_pretrained(str(tmp_path))
    _save_image_processor(cfg, tmp_path)
    checks = conv.check(model, cfg, tmp_path)
    assert checks and max(checks.values()) <= 1e-4, checks
    classifier = transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path), num_labels=3)
    assert type(classifier).__name__ == "IJepaForImageClassification"  # fine-tunes on the patch mean


def test_report_draws_the_blocks(tmp_path):
    model, cfg = small_ijepa()
    text = model.report(None, [{"images": torch.randint(0, 256, (9, 1, 28, 28), dtype=torch.uint8)}], cfg, tmp_path)
    assert (tmp_path / "jepa_blocks.png").stat().st_size > 0 and "blocks" in text
