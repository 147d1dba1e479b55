import pytest
import torch

from lmssl.config import ModelConfig
from lmssl.models import LMHead, TextBackbone
from lmssl.models.presets import PRESETS


def make(preset: str, **kw) -> ModelConfig:
    cfg = ModelConfig(**{**PRESETS[preset], "dim": 32, "n_layers": 2, "n_heads": 4, "max_positions": 32,
                         "vocab_size": 100, **kw})
    if cfg.mlp_hidden:
        cfg.mlp_hidden = 64
    return cfg


def test_shapes_and_padded_vocab():
    torch.manual_seed(0)
    cfg = make("gpt_tiny")
    b = TextBackbone(cfg)
    h = LMHead(cfg, b.tokens)
    ids = torch.randint(0, 100, (3, 10))
    assert b(ids).shape == (3, 10, 32)
    assert h(b(ids)).shape == (3, 10, 128)  # 100 padded to a multiple of 64
    assert h.weight is b.tokens.weight  # tied


def test_causal_output_ignores_future_tokens():
    torch.manual_seed(0)
    for preset in ("gpt_tiny", "llama_tiny"):
        b = TextBackbone(make(preset)).eval()
        ids = torch.randint(0, 100, (2, 12))
        changed = ids.clone()
        changed[:, 8:] = (changed[:, 8:] + 1) % 100
        a, c = b(ids), b(changed)
        assert torch.allclose(a[:, :8], c[:, :8], atol=1e-6)
        assert not torch.allclose(a[:, 8:], c[:, 8:], atol=1e-3)


def test_bidirectional_sees_future_and_padding_is_ignored():
    torch.manual_seed(0)
    b = TextBackbone(make("bert_tiny")).eval()
    ids = torch.randint(0, 100, (2, 12))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    assert not torch.allclose(b(ids)[:, 0], b(changed)[:, 0], atol=1e-4)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, -1] = 0  # the changed token is padding now: no effect on the real ones
    assert torch.allclose(b(ids, mask)[:, :-1], b(changed, mask)[:, :-1], atol=1e-5)


def test_causal_with_padding_matches_unpadded():
    torch.manual_seed(0)
    b = TextBackbone(make("llama_tiny")).eval()
    ids = torch.randint(0, 100, (1, 9))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, 3)], 1).long()
    assert torch.allclose(b(ids), b(padded, mask)[:, :9], atol=1e-5)


def test_gqa_and_variants_build():
    for preset in PRESETS:
        cfg = make(preset)
        if cfg.n_kv_heads:
            cfg.n_kv_heads = 2
        out = TextBackbone(cfg)(torch.randint(0, 100, (2, 5)))
        assert out.shape == (2, 5, 32) and torch.isfinite(out).all()


def test_weight_decay_groups():
    from lmssl.objectives import decay_groups

    b = TextBackbone(make("gpt_tiny"))
    decay, no_decay = decay_groups(b.parameters(), 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]


def test_activation_checkpointing_recomputes_blocks_and_gives_the_same_gradients():
    from lmssl.models import set_activation_checkpointing
    from lmssl.objectives.causal_lm import CausalLM

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    for preset in ("gpt_tiny", "llama_tiny"):
        torch.manual_seed(0)
        model = CausalLM(make(preset, dropout=0.1)).train()  # dropout: the recomputation must replay its draws
        calls = []
        model.backbone.core.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        grads = []
        for on in (False, True):
            assert set_activation_checkpointing(model, on) == 1
            calls.clear()
            torch.manual_seed(5)
            loss, _ = model({"input_ids": ids})
            loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            model.zero_grad(set_to_none=True)
            assert len(calls) == (2 if on else 1)  # forward, and once more in the backward pass
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)
        with torch.no_grad():  # no recomputation without gradients
            calls.clear()
            model({"input_ids": ids})
            assert len(calls) == 1


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_in_matches_the_plain_gated_projection(bias):
    """The fused gate/up function: same output and gradients as ``fc1(x).chunk(2)``, in float64
    (gradcheck) and float32, and under bf16 autocast the same dtype as ``F.linear`` gives."""
    import torch.nn.functional as F

    from lmssl.nn.mlp import swiglu_in

    def plain(x, w, b):
        gate, up = F.linear(x, w, b).chunk(2, dim=-1)
        return F.silu(gate) * up

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(2, 5, 8, generator=g, dtype=dtype, requires_grad=True)
        w = torch.randn(12, 8, generator=g, dtype=dtype, requires_grad=True)
        b = torch.randn(12, generator=g, dtype=dtype, requires_grad=True) if bias else None
        inputs = (x, w, b) if bias else (x, w)
        dy = torch.randn(2, 5, 6, generator=g, dtype=dtype)
        ours, ref = swiglu_in(x, w, b), plain(x, w, b)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
        for a, r in zip(torch.autograd.grad(ours, inputs, dy), torch.autograd.grad(ref, inputs, dy)):
            torch.testing.assert_close(a, r, atol=tol, rtol=tol)
        if dtype == torch.float64:
            assert torch.autograd.gradcheck(lambda *a: swiglu_in(*a), inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = swiglu_in(x, w, b), plain(x, w, b)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), atol=2e-2, rtol=2e-2)
    ours.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32


def test_eval_mode_restores_each_modules_own_mode_even_when_the_block_raises():
    from lmssl.models import eval_mode

    training, frozen = torch.nn.Dropout(0.5), torch.nn.Dropout(0.5).eval()
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(training), eval_mode(frozen):
            assert not training.training and not frozen.training
            raise RuntimeError("inside")
    assert training.training and not frozen.training
