"""ELECTRA: the discriminator's labels, where each loss sends its gradient, seeded sampling, export.

The objective is trained end to end by tests/objectives/test_conformance.py (-k electra);
these tests look inside one step of a tiny model on the bundled corpus's tokenizer.
"""

from __future__ import annotations

import pytest
import torch

from lmssl.config import load_config
from lmssl.data.tokenizer import load_tokenizer
from lmssl.objectives import build
from lmssl.objectives.electra import SHARED_EMBEDDINGS, sample_from_logits
from lmssl.train.loop import complete_model_config
from tests.conftest import ROOT

TINY = ["model.dim=64", "model.embedding_dim=32", "model.n_layers=2", "model.n_heads=2", "model.max_positions=64",
        "data.block_size=32", "electra.generator_size=0.5"]


# the pre-norm discriminator of recipes/electra_modernbert_tiny.yaml, as small (local attention inside 32 tokens)
MODERN = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.max_positions=64", "model.mlp_hidden=96",
          "model.local_attention=8", "model.global_every=2", "data.block_size=32", "electra.generator_size=0.5"]


def tiny(*overrides: str, recipe: str = "electra_tiny", base: list[str] = TINY):
    cfg = load_config(ROOT / "recipes" / f"{recipe}.yaml", base + list(overrides))
    tokenizer = load_tokenizer("default")
    complete_model_config(cfg, tokenizer)
    torch.manual_seed(0)
    return build(cfg, tokenizer), cfg, tokenizer


def text_batch(tokenizer, rows: int = 4, T: int = 32) -> dict[str, torch.Tensor]:
    from lmssl.data.text import CORPUS_DIR

    ids = tokenizer((CORPUS_DIR / "kjv_validation.txt").read_text(encoding="utf-8")[:20000])["input_ids"]
    return {"input_ids": torch.tensor(ids[: rows * T]).view(rows, T)}


def test_generator_is_a_quarter_as_wide_and_shares_the_embeddings():
    model, cfg, _ = tiny("electra.generator_size=0.25", "model.dim=256", "model.n_heads=4", "model.embedding_dim=128")
    g = model.gen_cfg
    assert (g.dim, g.n_heads, g.mlp_hidden, g.n_layers, g.embedding_dim) == (64, 1, 256, 2, 128)
    for name in SHARED_EMBEDDINGS:
        assert getattr(model.generator, name) is getattr(model.backbone, name)
    assert model.generator_head.weight is model.backbone.tokens.weight  # the generator's decoder: the shared tokens
    assert model.generator.embed_project is not model.backbone.embed_project  # each network projects on its own
    assert model.generator.embed_project.weight.shape == (64, 128) and model.backbone.embed_project.weight.shape == (256, 128)


def test_labels_are_exactly_token_differs_from_the_original():
    model, cfg, tok = tiny()
    batch = model.prepare_batch(text_batch(tok), torch.Generator().manual_seed(1))
    original, index = batch["original_ids"], batch["masked_index"]
    masked = torch.zeros(original.numel(), dtype=torch.bool)
    masked[index] = True
    masked = masked.view(original.shape)
    assert (batch["labels"][masked] == original[masked]).all() and (batch["labels"][~masked] == -100).all()
    # a generator certain of the original at every other masked position, and of another token elsewhere
    V = cfg.model.vocab_size
    logits = torch.full((index.numel(), V), -1e4)
    y = original.reshape(-1)[index]
    keep = torch.arange(index.numel()) % 2 == 0
    other = (y + 1) % V
    logits[torch.arange(index.numel()), torch.where(keep, y, other)] = 1e4
    corrupted, replaced = model.replace(batch, logits)
    assert torch.equal(replaced, corrupted != original)
    assert not replaced[~masked].any() and torch.equal(corrupted[~masked], original[~masked])
    flat = replaced.reshape(-1)[index]
    assert not flat[keep].any(), "a sampled token equal to the original counts as replaced"
    assert flat[~keep].all()
    assert int(replaced.sum()) == int((~keep).sum())


def test_a_sample_equal_to_the_original_is_not_counted_in_the_real_forward():
    """Through forward: the generator's head made certain of one token, and that token
    written into half the rows; only masked positions holding another token are replaced."""
    model, cfg, tok = tiny()
    x = 777
    with torch.no_grad():
        model.generator_head.bias.zero_()
        model.generator_head.bias[x] = 1e4
    raw = text_batch(tok)
    raw["input_ids"][:2] = x  # rows 0 and 1: every token is the one the generator will sample
    batch = model.prepare_batch(raw, torch.Generator().manual_seed(2))
    _, metrics = model(batch)
    original, index = batch["original_ids"], batch["masked_index"]
    expected = int((original.reshape(-1)[index] != x).sum())
    assert expected > 0 and int(metrics["replaced_tokens"]) == expected


@pytest.mark.parametrize("layout", ["electra", "modernbert"])
def test_generator_gets_gradient_only_from_its_mlm_loss(layout):
    """Gradients with the detection loss weighted 0 and 50, on the same batch and samples:
    the generator's own weights get identical gradients (the detection loss sends them
    none), the discriminator's own weights none from the MLM loss, and the shared
    embeddings get both; with BERT's post-norm layout and with ModernBERT's pre-norm one."""
    model, cfg, tok = tiny() if layout == "electra" else tiny(recipe="electra_modernbert_tiny", base=MODERN)
    batch = model.prepare_batch(text_batch(tok), torch.Generator().manual_seed(3))

    def grads(weight: float) -> dict[str, torch.Tensor]:
        model.electra.disc_weight = weight
        model.zero_grad(set_to_none=True)
        model(batch)[0].backward()
        return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}

    mlm_only, both = grads(0.0), grads(50.0)
    params = dict(model.named_parameters())
    shared = {id(p) for m in SHARED_EMBEDDINGS if getattr(model.backbone, m) is not None  # ModernBERT: no positions
              for p in getattr(model.backbone, m).parameters()}
    generator_own = [n for n, p in params.items() if n.startswith(("generator.", "generator_head.")) and id(p) not in shared]
    discriminator_own = [n for n, p in params.items() if n.startswith(("backbone.", "detector.")) and id(p) not in shared]
    shared_names = [n for n, p in params.items() if id(p) in shared]
    assert generator_own and discriminator_own and "backbone.tokens.weight" in shared_names
    for n in generator_own:
        assert torch.equal(mlm_only[n], both[n]), f"the detection loss reached the generator's {n}"
    assert any(mlm_only[n].abs().sum() > 0 for n in generator_own)
    for n in discriminator_own:
        assert mlm_only[n].abs().sum() == 0, f"the MLM loss reached the discriminator's {n}"
        assert both[n].abs().sum() > 0, f"the detection loss did not reach {n}"
    for n in shared_names:
        if n.endswith("token_types.weight"):
            continue  # only row 0 is used; both losses reach it, checked with the others below
        assert mlm_only[n].abs().sum() > 0 and not torch.equal(mlm_only[n], both[n]), f"{n} should get both losses"


def test_sampling_is_seeded_and_replays():
    model, cfg, tok = tiny()
    raw = text_batch(tok)

    def replacements(seed: int) -> torch.Tensor:
        batch = model.prepare_batch(raw, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return model.replace(batch, model.masked_logits(batch)[0])[0]

    assert torch.equal(replacements(5), replacements(5))
    assert not torch.equal(replacements(5), replacements(6))


def test_samples_follow_the_softmax_not_the_argmax():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = probs.clamp_min(1e-30).log().expand(40000, 4)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(sample_from_logits(logits, u), minlength=4).float() / 40000
    assert torch.allclose(freq, probs, atol=0.01) and freq[3] == 0
    assert torch.equal(sample_from_logits(logits * 2, u, temperature=2.0), sample_from_logits(logits, u))


def test_export_parity_and_fine_tuning_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification, ElectraForPreTraining

    from lmssl.export.core import export_model, probe_batch

    model, cfg, tok = tiny()
    with torch.no_grad():  # away from the initialisation, so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    result = export_model(model, cfg, tok, tmp_path / "export", log=lambda m: None)
    assert result.architecture == "ElectraForPreTraining" and len(result.checks) == 3
    assert max(result.checks.values()) <= 1e-4
    assert (tmp_path / "export" / "generator" / "config.json").is_file()
    assert (tmp_path / "export" / "generator" / "tokenizer.json").is_file()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", num_labels=3).eval()
    assert type(classifier).__name__ == "ElectraForSequenceClassification"
    pretraining = ElectraForPreTraining.from_pretrained(tmp_path / "export").eval()
    ids, mask = probe_batch(cfg)
    with torch.no_grad():  # the classifier's encoder is the exported discriminator
        a = classifier.electra(input_ids=ids, attention_mask=mask).last_hidden_state
        b = pretraining.electra(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.equal(a, b) and classifier(input_ids=ids, attention_mask=mask).logits.shape == (2, 3)


def test_modernbert_discriminator_exports_as_modernbertmodel_and_fine_tunes(tmp_path):
    """The pre-norm discriminator (recipes/electra_modernbert_tiny.yaml) exports its body as
    ModernBertModel, hidden states within 1e-4 (over a batch longer than the local window), and
    AutoModelForSequenceClassification puts a fresh classifier over exactly that body."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from lmssl.export.core import export_model, probe_batch

    model, cfg, tok = tiny(recipe="electra_modernbert_tiny", base=MODERN)
    assert cfg.model.family == "modernbert" and cfg.model.norm_position == "pre"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    result = export_model(model, cfg, tok, tmp_path / "export", log=lambda m: None)
    assert result.architecture == "ModernBertModel" and result.checks
    assert max(result.checks.values()) <= 1e-4
    ids, mask = probe_batch(cfg)
    body = AutoModel.from_pretrained(tmp_path / "export").eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export", num_labels=3).eval()
    assert type(classifier).__name__ == "ModernBertForSequenceClassification"
    assert classifier.config.classifier_pooling == "mean"  # packed pretraining: no class token to pool
    with torch.no_grad():
        ours = model.hidden(ids, mask)
        theirs = body(input_ids=ids, attention_mask=mask).last_hidden_state
        again = classifier.model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        assert float((ours - theirs)[real].abs().max()) <= 1e-4 and torch.equal(theirs, again)
        assert classifier(input_ids=ids, attention_mask=mask).logits.shape == (ids.shape[0], 3)


def test_modernbert_recipe_trains(tmp_path):
    """The conformance test trains electra_tiny (the objective's recipe); this trains the
    pre-norm recipe, shrunk, through the real loop: the loss on the batches it trained on falls
    below that of the same network at initialisation."""
    from lmssl.runs import load_run
    from lmssl.train.loop import train
    from tests.objectives.test_conformance import GENERIC, trained_batches_loss

    out = tmp_path / "run"
    cfg = load_config(ROOT / "recipes" / "electra_modernbert_tiny.yaml",
                      MODERN + GENERIC + ["train.max_steps=6", "train.save_every=0", f"train.output_dir={out}"])
    assert train(cfg)["step"] == 6
    model, cfg, tok = load_run(out)
    assert cfg.model.family == "modernbert"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        initial = build(cfg, tok)
    before, after = trained_batches_loss(initial, cfg, tok), trained_batches_loss(model, cfg, tok)
    assert after < before, f"loss {before:.4f} at initialisation, {after:.4f} after 6 steps"


def test_bad_sizes_fail_in_one_line():
    from lmssl.errors import UserError

    with pytest.raises(UserError, match="generator_size"):
        tiny("electra.generator_size=0")
    with pytest.raises(UserError, match="mask_rate"):
        tiny("electra.mask_rate=1.5")
