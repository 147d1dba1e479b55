"""Masked LM: the masked-only head, masking statistics on both paths, training through the
loop (packed and line-by-line), fill-mask and its command."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmssl.cli import main as cli_main
from lmssl.config import load_config
from lmssl.data.batches import build_text_data
from lmssl.data.text import BUNDLED
from lmssl.data.tokenizer import load_tokenizer
from lmssl.errors import UserError
from lmssl.evaluate import evaluate_objective
from lmssl.masking import IGNORE_INDEX, select_masked
from lmssl.objectives.mlm import MaskedLM, MaskingSpec, encode_with_masks, fill_mask
build = MaskedLM.build
from lmssl.models.flops import transformer_flops_per_token
from lmssl.train.log import read_log
from lmssl.runs import load_run
from lmssl.train.loop import train
from tests.conftest import ROOT, TINY

RECIPE = ROOT / "recipes" / "bert_tiny.yaml"
# TINY without its GPT preset: the recipe's bert_tiny preset stays, shrunk to test size.
TINY_MLM = [o for o in TINY if not o.startswith("model.preset=")]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def tiny_cfg(*extra: str, tokenizer=None):
    cfg = load_config(RECIPE, TINY_MLM + list(extra))
    if tokenizer is not None:
        cfg.model.vocab_size = len(tokenizer)
    return cfg


def corpus_rows(tok, rows: int, length: int) -> torch.Tensor:
    """``(rows, length)`` ids of held-out text, documents separated by end-of-text."""
    text = [ln for ln in open(BUNDLED["validation"][0], encoding="utf-8").read().splitlines() if ln.strip()]
    ids: list[int] = []
    for line in text:
        ids += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= rows * length:
            break
    return torch.tensor(ids[: rows * length]).view(rows, length)


def masking_stats(original: torch.Tensor, corrupted: torch.Tensor, labels: torch.Tensor, mask_id: int,
                  eligible: torch.Tensor) -> dict[str, float]:
    chosen = labels != IGNORE_INDEX
    n = int(chosen.sum())
    return {"rate": n / int(eligible.sum()),
            "to_mask": float((corrupted[chosen] == mask_id).float().mean()),
            "kept": float((corrupted[chosen] == original[chosen]).float().mean()),
            "outside": int((chosen & ~eligible).sum()), "n": n}


# ----------------------------------------------------------------------------- the head


def test_masked_only_head_equals_full_head_at_masked_positions(tok):
    torch.manual_seed(0)
    model = build(tiny_cfg(tokenizer=tok), tok).eval()
    batch = model.prepare_batch({"input_ids": corpus_rows(tok, 4, 32)}, torch.Generator().manual_seed(1))
    full = model.logits(batch["input_ids"])  # (B, T, V), every position
    h_sel, y = select_masked(model.hidden(batch["input_ids"]), batch["labels"])
    masked_only = model.head(h_sel)[:, : len(tok)]  # (N, V)
    at_mask = full[batch["labels"] != IGNORE_INDEX]
    assert masked_only.shape == at_mask.shape and masked_only.shape[0] == int((batch["labels"] != -100).sum()) > 0
    torch.testing.assert_close(masked_only, at_mask, rtol=1e-5, atol=1e-5)
    loss, metrics = model(batch)
    ref = F.cross_entropy(full.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert metrics["masked_tokens"] == y.numel()
    assert metrics["accuracy"] == (at_mask.argmax(-1) == y).float().mean()


def test_compiled_forward_stops_recompiling_whatever_the_number_of_masked_rows(tok):
    """The masked-row count changes every batch; the backbone's graph must not follow it
    (dynamo's 'eager' backend: the same tracing and guards as the real one, no codegen)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build(tiny_cfg(tokenizer=tok), tok)
    compiled = torch.compile(model, backend="eager")
    ids = corpus_rows(tok, 4, 32)
    counts, graphs = set(), []
    for seed in range(8):
        batch = model.prepare_batch({"input_ids": ids}, torch.Generator().manual_seed(seed))
        counts.add(batch["masked_index"].numel())
        loss, _ = compiled(batch)
        torch.testing.assert_close(loss, model(batch)[0])
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(counts) >= 5  # the batches really differ in masked rows
    # the first batch compiles, the second makes masked_index's length dynamic; then nothing more
    assert graphs[1] == graphs[-1] <= 4, graphs
    torch._dynamo.reset()


def test_flops_count_the_head_only_at_masked_positions(tok):
    model = build(tiny_cfg("mlm.mask_rate=0.2", tokenizer=tok), tok)
    m = model.cfg
    full = transformer_flops_per_token(m, model.backbone.num_params(), 32)
    head = m.dim * m.vocab_size + m.dim * m.dim  # bert_tiny has the head transform
    assert model.flops_per_token(32) == pytest.approx(full - 6 * m.dim * m.vocab_size + 6 * 0.2 * head)


# ----------------------------------------------------------------------------- masking


def test_prepare_batch_statistics_and_determinism(tok):
    model = build(tiny_cfg(tokenizer=tok), tok)
    ids = corpus_rows(tok, 128, 32)  # 4096 positions
    ids[::4, -6:] = tok.pad_token_id
    attn = (ids != tok.pad_token_id).long()
    batch = {"input_ids": ids, "attention_mask": attn}
    out = model.prepare_batch(batch, torch.Generator().manual_seed(0))
    assert torch.equal(batch["input_ids"], ids)  # the caller's batch is not modified
    eligible = ~torch.isin(ids, torch.tensor(tok.all_special_ids)) & (attn == 1)
    s = masking_stats(ids, out["input_ids"], out["labels"], tok.mask_token_id, eligible)
    assert s["outside"] == 0  # never a special token or padding
    assert abs(s["rate"] - 0.15) < 0.02, s
    assert abs(s["to_mask"] - 0.8) < 0.04 and abs(s["kept"] - 0.1) < 0.04, s
    chosen = out["labels"] != IGNORE_INDEX
    assert torch.equal(out["labels"][chosen], ids[chosen])
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])  # only chosen positions change

    again = model.prepare_batch(batch, torch.Generator().manual_seed(0))
    other = model.prepare_batch(batch, torch.Generator().manual_seed(1))
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(out["labels"], other["labels"])


def test_device_path_has_the_collator_statistics(tok):
    """mask_on_device: prepare_batch only adds a seed; forward masks with the same core."""
    collator = build(tiny_cfg(tokenizer=tok), tok)
    device_side = build(tiny_cfg("mlm.mask_on_device=true", tokenizer=tok), tok)
    ids = corpus_rows(tok, 128, 32)
    eligible = ~torch.isin(ids, torch.tensor(tok.all_special_ids))

    prepared = device_side.prepare_batch({"input_ids": ids}, torch.Generator().manual_seed(0))
    assert set(prepared) == {"input_ids", "mask_seed"} and prepared["mask_seed"].dtype == torch.long
    assert torch.equal(prepared["input_ids"], ids)
    again = device_side.prepare_batch({"input_ids": ids}, torch.Generator().manual_seed(0))
    assert int(again["mask_seed"]) == int(prepared["mask_seed"])

    # forward draws from a generator on the batch's device seeded by mask_seed ...
    g = torch.Generator(device=ids.device).manual_seed(int(prepared["mask_seed"]))
    corrupted, labels = device_side.mask_batch(ids, None, g)
    dev = masking_stats(ids, corrupted, labels, tok.mask_token_id, eligible)
    col_batch = collator.prepare_batch({"input_ids": ids}, torch.Generator().manual_seed(0))
    col = masking_stats(ids, col_batch["input_ids"], col_batch["labels"], tok.mask_token_id, eligible)
    for k in ("rate", "to_mask", "kept"):
        assert abs(dev[k] - col[k]) < 0.04, (k, dev, col)
    assert dev["outside"] == col["outside"] == 0
    # ... and forward itself masks exactly those positions, the same way every time
    _, m1 = device_side(prepared)
    _, m2 = device_side(prepared)
    assert int(m1["masked_tokens"]) == dev["n"] and torch.equal(m1["loss"], m2["loss"])


def test_whole_word_and_span_masking(tok):
    ids = corpus_rows(tok, 64, 64)
    eligible = ~torch.isin(ids, torch.tensor(tok.all_special_ids))
    ww = build(tiny_cfg("mlm.masking=whole_word", tokenizer=tok), tok)
    assert ww.spec.scheme == "byte_bpe"
    out = ww.prepare_batch({"input_ids": ids}, torch.Generator().manual_seed(0))
    chosen = out["labels"] != IGNORE_INDEX
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.03
    # a word is masked whole: a continuation piece ("sat" + "h" ...) is masked iff its word start is
    starts = ww.spec.word_starts[ids] | ~eligible
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if eligible[b, t] and not starts[b, t] and eligible[b, t - 1]:
                assert chosen[b, t] == chosen[b, t - 1]

    sp = build(tiny_cfg("mlm.masking=span", tokenizer=tok), tok)
    out = sp.prepare_batch({"input_ids": ids}, torch.Generator().manual_seed(0))
    chosen = out["labels"] != IGNORE_INDEX
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01 and not (chosen & ~eligible).any()
    runs = (chosen[:, 1:] & chosen[:, :-1]).sum() / chosen.sum()  # spans: most chosen tokens have a chosen neighbour
    assert runs > 0.5


def test_bad_masking_settings_are_one_line_errors(tok):
    with pytest.raises(UserError, match="mlm.masking must be one of"):
        build(tiny_cfg("mlm.masking=words", tokenizer=tok), tok)
    with pytest.raises(UserError, match="mask_token_prob"):
        build(tiny_cfg("mlm.mask_token_prob=0.9", "mlm.random_token_prob=0.2", tokenizer=tok), tok)


# ----------------------------------------------------------------------------- training through the loop


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory):
    """The CI smoke: the shipped bert_tiny recipe, shrunk, trains 2 steps and reports."""
    out = tmp_path_factory.mktemp("mlm") / "run"
    cfg = load_config(RECIPE, TINY_MLM + [f"train.output_dir={out}", "train.max_steps=2", "mlm.fill_examples=2"])
    return out, train(cfg)


def test_bert_tiny_recipe_trains_two_steps(mlm_run):
    out, result = mlm_run
    assert result["step"] == 2 and np.isfinite(result["eval_loss"]) and 0 <= result["eval_accuracy"] <= 1
    rows = [r for r in read_log(out / "log.jsonl") if r.get("kind") != "eval"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(k in rows[-1] for k in ("loss", "accuracy", "masked_tokens", "tokens_per_s", "mfu"))
    assert "[MASK]" in result["report"] and "top-1 correct on" in result["report"]
    model, cfg, _ = load_run(out)
    assert isinstance(model, MaskedLM) and cfg.objective == "mlm" and cfg.model.family == "bert"


def test_masked_token_accuracy_rises(tmp_path, tok):
    """From chance to well above it, and below the unigram loss (it reads the context)."""
    cfg = load_config(RECIPE, TINY_MLM + [f"train.output_dir={tmp_path}", "train.max_steps=500", "train.eval_every=0",
                                          "train.save_every=0", "train.log_every=50", "train.micro_batch_size=16",
                                          "data.eval_blocks=64", "optim.lr=2e-3", "optim.warmup_steps=30",
                                          "mlm.fill_examples=1"])
    cfg.model.vocab_size = len(tok)
    data = build_text_data(cfg, tok, log=lambda msg: None)
    untrained = build(cfg, tok)
    eval_batches = [untrained.prepare_batch(b, torch.Generator().manual_seed(i)) for i, b in enumerate(data.eval_batches)]
    start = evaluate_objective(untrained, eval_batches, torch.device("cpu"))["accuracy"]
    # the best a model that ignores the context can do: unigram frequencies of the training text
    counts = np.bincount(np.asarray(data.train.tf.tokens, dtype=np.int64), minlength=len(tok)) + 1.0
    counts[tok.all_special_ids] = 0
    held_out = torch.cat([b["input_ids"].flatten() for b in data.eval_batches]).numpy()
    held_out = held_out[~np.isin(held_out, tok.all_special_ids)]
    unigram_loss = float(-np.log(counts[held_out] / counts.sum()).mean())

    result = train(cfg)
    assert start < 0.01 and result["eval_accuracy"] > start + 0.08, (start, result["eval_accuracy"])
    assert result["eval_loss"] < unigram_loss - 0.15, (result["eval_loss"], unigram_loss)


def test_line_by_line_padded_batches_train(tmp_path, tok):
    cfg = load_config(RECIPE, TINY_MLM + [f"train.output_dir={tmp_path}", "data.packing=false", "train.max_steps=30",
                                          "train.eval_every=0", "train.save_every=0", "mlm.fill_examples=1",
                                          "mlm.mask_on_device=true"])
    result = train(cfg)
    rows = [r for r in read_log(tmp_path / "log.jsonl") if r.get("kind") != "eval"]
    assert np.mean([r["loss"] for r in rows[-5:]]) < rows[0]["loss"] - 1.0
    assert np.isfinite(result["eval_loss"])


# ----------------------------------------------------------------------------- fill-mask


def test_fill_mask_markers_and_probabilities(tok):
    torch.manual_seed(0)
    model = build(tiny_cfg(tokenizer=tok), tok)
    ids, positions = encode_with_masks(tok, "The [MASK] sat on the <mask>.")
    assert tok.convert_ids_to_tokens(ids) == ["The", "<mask>", "Ġsat", "Ġon", "Ġthe", "<mask>", "."]
    assert positions == [1, 5]
    a = fill_mask(model, tok, "The [MASK] sat on the mat.", top_k=4)
    b = fill_mask(model, tok, "The <mask> sat on the mat.", top_k=4)
    assert a == b and len(a) == 1 and len(a[0]) == 4
    probs = [p for _, p in a[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert len(fill_mask(model, tok, "[MASK] [MASK] and <mask>", top_k=2)) == 3
    with pytest.raises(UserError, match="no mask"):
        fill_mask(model, tok, "no mask here")


def test_fill_mask_command(mlm_run, tmp_path, capsys):
    out, _ = mlm_run
    assert cli_main(["fill-mask", str(out), "And God [MASK] the light.", "--top-k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "And God [MASK] the light." and printed[1] == "mask 1 of 1:"
    fills = printed[2:]
    # each line: rank, the fill, its probability, the sentence with it ("Godeafter": a fill may continue a word)
    assert len(fills) == 3 and all(f.split()[0] == f"{i}." and f.rstrip().endswith("the light.")
                                   for i, f in enumerate(fills, start=1))
    assert sum(float(f.split()[2]) for f in fills) <= 1.0

    clm = tmp_path / "clm"
    train(load_config(None, TINY + [f"train.output_dir={clm}", "train.max_steps=1", "train.sample_tokens=2"]))
    capsys.readouterr()
    assert cli_main(["fill-mask", str(clm), "The [MASK] sat."]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'clm' run" in err[0] and "objective mlm" in err[0]


@pytest.mark.parametrize("kind,scheme", [("unigram", "sentencepiece"), ("wordpiece", "wordpiece"), ("bpe", "byte_bpe")])
def test_other_tokenizers_mask_words_and_encode_masks(kind, scheme):
    """Word marks are detected per tokenizer family, and mask texts encode like the full sentence."""
    from lmssl.data.tokenizer import train_tokenizer

    t = train_tokenizer(BUNDLED["train"][0], 600, kind, max_lines=400)
    s = MaskingSpec.from_tokenizer(t, "whole_word")
    assert s.scheme == scheme and s.word_starts.shape == (len(t),)
    # "The [MASK] sat": the text around the mask encodes as it does in the full sentence
    full = t("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    cat = t(" cat" if kind != "wordpiece" else "cat", add_special_tokens=False)["input_ids"]
    ids, positions = encode_with_masks(t, "The [MASK] sat on the mat.")
    p = positions[0]
    assert ids[:p] + ids[p + 1:] == full[:p] + full[p + len(cat):], (t.convert_ids_to_tokens(ids), t.convert_ids_to_tokens(full))
