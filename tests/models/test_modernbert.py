"""The modernbert family: the shared core with ModernBERT's config values computes what
transformers' ModernBertForMaskedLM / ModernBertModel compute, tensor for tensor."""

from __future__ import annotations

import pytest
import torch

from lmssl.config import ModelConfig, RunConfig, load_config
from lmssl.errors import UserError
from lmssl.export.core import build_model
from lmssl.export.transformers_map import FamilyMismatch, check_family, find_converter, modernbert_config
from lmssl.models import PRESETS, LMHead, TextBackbone
from lmssl.nn import Attention, local_attention_mask
from tests.export._runs import perturb

TOL = 1e-4
V = 300  # a small vocabulary keeps the random models quick


class _Tok:
    """The token ids the converter reads from a tokenizer."""

    bos_token_id = eos_token_id = 0
    pad_token_id, mask_token_id, cls_token_id, sep_token_id = 1, 3, 4, 5


class _Masked(torch.nn.Module):
    """The MaskedLM contract (.backbone + .head), built directly."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = TextBackbone(cfg)
        self.head = LMHead(cfg, self.backbone.tokens)


def _config(**model) -> RunConfig:
    cfg = load_config(None, ["objective=mlm", "model.preset=modernbert_tiny", "model.dim=64", "model.n_layers=4",
                             "model.n_heads=4", "model.mlp_hidden=96", "model.max_positions=96", "data.block_size=64"])
    cfg.model.vocab_size = V
    for k, v in model.items():
        setattr(cfg.model, k, v)
    return cfg


def _batch(B: int = 3, T: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids; row 1 ends in 20 padding positions, row 2 in 50 (far beyond a 16-token window)."""
    ids = torch.randint(6, V, (B, T), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - 20:] = 0
    mask[2, T - 50:] = 0
    return ids, mask


CASES = {  # name -> model fields on top of the (shrunk) modernbert_tiny preset
    "global_no_bias": dict(local_attention=0),
    "global_bias": dict(local_attention=0, bias=True),
    "local16_no_bias": dict(local_attention=16),  # blocks 1, 2 local: |i - j| <= 8 of T = 64
    "local16_bias_untied": dict(local_attention=16, bias=True, tie_embeddings=False, head_bias=False),
    "local10_every2_same_theta": dict(local_attention=10, global_every=2, local_rope_theta=0.0, n_layers=3),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_hidden_states_match_modernbert(case, attn):
    cfg = _config(**CASES[case])
    m = cfg.model
    assert check_family(m) == []
    torch.manual_seed(0)
    objective = perturb(_Masked(m)).eval()  # every tensor off its init: a swapped one would show
    conv = find_converter(cfg)(objective, cfg, _Tok())
    conv.config._attn_implementation = attn
    hf = build_model(conv)  # strict: every name mapped, nothing left over
    assert type(hf).__name__ == "ModernBertForMaskedLM"
    ids, mask = _batch()
    keep = mask.bool()
    with torch.no_grad():
        hidden = objective.backbone(ids, mask, is_causal=False)  # (B, T, dim)
        logits = objective.head(hidden)[..., :V]
        out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        theirs_hidden = hf.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert float((logits - out.logits)[keep].abs().max()) < TOL
    assert float((hidden - theirs_hidden)[keep].abs().max()) < TOL
    assert [t == "sliding_attention" for t in hf.config.layer_types] == [b.local for b in objective.backbone.core.blocks]
    if m.local_attention:  # the window matters at this length: the same weights all-global differ
        conv.config.layer_types = ["full_attention"] * m.n_layers
        with torch.no_grad():
            global_logits = build_model(conv)(input_ids=ids, attention_mask=mask).logits
        assert float((logits - global_logits)[keep].abs().max()) > 1e-2


def test_block_zero_has_no_attention_norm_and_the_layout_is_modernbert():
    m = _config().model
    core = TextBackbone(m).core
    assert isinstance(core.blocks[0].norm1, torch.nn.Identity)
    assert isinstance(core.blocks[1].norm1, torch.nn.LayerNorm) and core.blocks[1].norm1.bias is None
    assert [b.local for b in core.blocks] == [False, True, True, False]  # global every 3: blocks 0 and 3
    assert core.local_rope is not None and core.rope is not None  # bases 10000 and 160000
    assert float(core.local_rope.inv_freq[1]) != float(core.rope.inv_freq[1])
    # other families are unchanged: every block normed, no local blocks, one rotary table
    llama = TextBackbone(ModelConfig(**{**PRESETS["llama_tiny"], "vocab_size": V})).core
    assert all(isinstance(b.norm1, torch.nn.RMSNorm) for b in llama.blocks) and not llama.has_local
    assert llama.local_rope is None and not any(b.local for b in llama.blocks)


def test_local_attention_mask_is_a_band_of_half_the_window():
    T, window = 10, 5  # half = 2: |i - j| <= 2
    mask = local_attention_mask(None, T, window, torch.device("cpu"))
    assert mask.shape == (1, 1, T, T)
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    assert torch.equal(mask[0, 0], (i - j).abs() <= 2)
    pad = torch.ones(2, T, dtype=torch.long)
    pad[1, 4:] = 0
    padded = local_attention_mask(pad, T, window, torch.device("cpu"))
    assert padded.shape == (2, 1, T, T)
    assert not padded[1, 0, :4, 4:].any()  # real queries never see padding
    assert padded[1, 0, 9].tolist() == [False] * 9 + [True]  # a far padded query keeps itself: no empty row
    assert local_attention_mask(pad, T, 18, torch.device("cpu")) is pad  # window spans the sequence: global


def test_local_attention_sees_only_its_window():
    """One attention layer under the local mask: a change at position 63 reaches only the
    queries within 8 positions of it (window 16)."""
    torch.manual_seed(0)
    attn = Attention(32, 4, bias=False).eval()
    x = torch.randn(1, 64, 32)
    changed = x.clone()
    changed[0, 63] += 1.0
    mask = local_attention_mask(None, 64, 16, x.device)
    with torch.no_grad():
        a, b = attn(x, mask), attn(changed, mask)
    moved = (a - b).abs().amax(-1)[0] > 1e-6  # (T,)
    assert moved.nonzero().flatten().tolist() == list(range(55, 64))


def test_family_mismatch_is_refused_with_the_field_named():
    cfg = _config(norm="rmsnorm")
    with pytest.raises(FamilyMismatch, match="model.norm='rmsnorm' but modernbert needs 'layernorm'"):
        find_converter(cfg)
    assert check_family(_config(first_attn_norm=True).model) == [
        "model.first_attn_norm=True but modernbert needs False"]
    assert any("grouped-query" in p for p in check_family(_config(n_kv_heads=2).model))
    assert check_family(_config(head_transform=False).model, head=True) == [
        "model.head_transform=False but modernbert needs True"]
    # the families without local attention refuse it
    bert = load_config(None, ["objective=mlm", "model.preset=bert_tiny", "model.local_attention=16"])
    assert check_family(bert.model) == ["model.local_attention=16 but bert needs 0"]


def test_config_checks_and_old_fingerprints(monkeypatch):
    with pytest.raises(UserError, match="first_attn_norm=false needs model.norm_position=pre"):
        load_config(None, ["model.preset=bert_tiny", "model.first_attn_norm=false"])
    with pytest.raises(UserError, match="global_every must be at least 1"):
        load_config(None, ["model.preset=modernbert_tiny", "model.global_every=0"])
    # fields added later leave the fingerprint of a run that predates them as it was
    cfg = load_config(None, ["objective=mlm", "model.preset=bert_tiny"])
    before = cfg.fingerprint()
    to_dict = RunConfig.to_dict

    def without_late_fields(self):
        d = to_dict(self)
        for k in ModelConfig.LATE_FIELDS:
            d["model"].pop(k)
        return d

    monkeypatch.setattr(RunConfig, "to_dict", without_late_fields)
    assert cfg.fingerprint() == before  # what an lmssl without those fields computed
    monkeypatch.undo()
    cfg.model.local_attention = 16
    assert cfg.fingerprint() != before


def test_modernbert_base_preset_has_modernbert_base_shape():
    from transformers import ModernBertConfig

    cfg = load_config(None, ["objective=mlm", "model.preset=modernbert_base"])
    cfg.model.vocab_size = 50368
    conv_config = modernbert_config(cfg.model, _Tok(), "ModernBertForMaskedLM")
    ref = ModernBertConfig()  # answerdotai/ModernBERT-base's defaults
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "hidden_activation",
                "max_position_embeddings", "norm_eps", "norm_bias", "attention_bias", "mlp_bias", "classifier_bias",
                "decoder_bias", "local_attention", "layer_types", "rope_parameters", "tie_word_embeddings"):
        assert getattr(conv_config, key) == getattr(ref, key), key
