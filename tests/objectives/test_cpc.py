"""CPC: shapes, the InfoNCE wiring against a direct formulation, a perfect predictor,
candidate counts of both negative schemes, bad block sizes, and training through the loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmssl.config import load_config
from lmssl.data.tokenizer import load_tokenizer
from lmssl.errors import UserError
from lmssl.objectives.cpc import CPC, check_cpc_config, latent_std, predictive_nce
from lmssl.train.log import read_log
from lmssl.runs import load_run
from lmssl.train.loop import train
from tests.conftest import ROOT, TINY

RECIPE = ROOT / "recipes" / "cpc_tiny.yaml"
# TINY without its GPT preset (the recipe's bert_tiny preset stays, shrunk to test size);
# block 32 = 4 segments of 8 tokens, so at most 3 prediction steps.
TINY_CPC = [o for o in TINY if not o.startswith("model.preset=")] + ["cpc.prediction_steps=2"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def tiny_model(tok, *extra: str) -> CPC:
    cfg = load_config(RECIPE, TINY_CPC + list(extra))
    cfg.model.vocab_size = len(tok)
    torch.manual_seed(0)
    return CPC.build(cfg, tok)


def unit_latents(B: int, S: int, D: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----------------------------------------------------------------------------- shapes


def test_shapes_and_metrics(tok):
    model = tiny_model(tok)
    ids = torch.randint(0, len(tok), (3, 32))
    z, valid = model.encode(ids)
    assert z.shape == (3, 4, 64) and valid is None
    assert model.contextualize(z).shape == (3, 4, 64)
    assert model.context_features(ids).shape == (3, 64)
    loss, metrics = model({"input_ids": ids})
    assert loss.shape == () and loss.requires_grad
    assert set(metrics) == {"loss", "accuracy", "chance", "z_std", "loss_k1", "acc_k1", "loss_k2", "acc_k2"}
    assert all(v.shape == () and not v.requires_grad for v in metrics.values())
    # W_k start at zero: the untrained model ranks all 12 candidates equally
    assert float(metrics["loss"]) == pytest.approx(math.log(3 * 4), abs=1e-5)
    assert float(metrics["chance"]) == pytest.approx(1 / 12)
    # the encoder is a stock TextBackbone over one segment; the backbone alias is the same module
    assert model.backbone is model.encoder and model.encoder.cfg.max_positions == 8
    assert model.encoder.cfg.n_layers == 2 and not model.encoder.cfg.causal and model.context_cfg.causal
    assert model.flops_per_token(32) > 0


def test_padded_batch_matches_the_unpadded_rows(tok):
    """Unpacked data: a ragged batch is padded to a multiple of L; real segments are unchanged."""
    model = tiny_model(tok).eval()
    ids = torch.randint(0, len(tok), (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 20:] = 0  # row 1: 20 real tokens -> segments 0, 1 full, 2 half, 3 empty
    z, valid = model.encode(ids, mask)
    assert valid.tolist() == [[True] * 4, [True, True, True, False]]
    z_row1, _ = model.encode(ids[1:, :16])
    torch.testing.assert_close(z[1, :2], z_row1[0], rtol=1e-5, atol=1e-5)
    feats = model.context_features(ids, mask)
    torch.testing.assert_close(feats[1], model.contextualize(z[1:, :3]).mean(dim=1)[0], rtol=1e-5, atol=1e-5)
    loss, metrics = model({"input_ids": ids, "attention_mask": mask})
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())


# ----------------------------------------------------------------------------- the loss


def test_info_nce_wiring_matches_direct_formulation():
    B, S, D, T = 2, 5, 8, 0.3
    g = torch.Generator().manual_seed(1)
    zn = unit_latents(B, S, D)
    preds = [torch.randn(B, S - k, D, generator=g) for k in (1, 2)]
    losses, accs, candidates = predictive_nce(preds, zn, T, "batch")
    keys = zn.reshape(B * S, D)
    for k, pred in enumerate(preds, start=1):
        rows, hits = [], []
        for b in range(B):
            for t in range(S - k):
                logits = keys @ pred[b, t] / T  # (B*S,) scores of every latent in the batch
                rows.append(torch.logsumexp(logits, 0) - logits[b * S + t + k])
                hits.append(float(logits.argmax() == b * S + t + k))
        torch.testing.assert_close(losses[k - 1], torch.stack(rows).mean())
        assert float(accs[k - 1]) == pytest.approx(sum(hits) / len(hits))
    assert candidates == B * S
    # sequence negatives: the same formula with the query's own sequence as the key set
    losses, _, candidates = predictive_nce(preds, zn, T, "sequence")
    direct = torch.stack([torch.logsumexp(zn[b] @ preds[0][b, t] / T, 0) - zn[b, t + 1] @ preds[0][b, t] / T
                          for b in range(B) for t in range(S - 1)]).mean()
    torch.testing.assert_close(losses[0], direct)
    assert candidates == S


@pytest.mark.parametrize("negatives", ["batch", "sequence"])
def test_perfect_predictor_ranks_the_future_first(negatives):
    """W_k c_t = (a long vector along) z_{t+k}: every positive ranks first, the loss vanishes."""
    B, S, D, K = 3, 6, 32, 3
    zn = unit_latents(B, S, D, seed=2)
    preds = [20.0 * zn[:, k:] for k in range(1, K + 1)]  # prediction at t is z_{t+k}
    losses, accs, _ = predictive_nce(preds, zn, 0.1, negatives)
    assert all(float(a) == 1.0 for a in accs)
    assert all(float(l) < 1e-3 for l in losses)
    # the same predictor shifted by one step points at the wrong segment: accuracy 0
    _, wrong, _ = predictive_nce([20.0 * zn[:, :-1]], zn, 0.1, negatives)
    assert float(wrong[0]) == 0.0


def test_candidate_counts_of_batch_and_sequence_negatives(tok):
    ids = torch.randint(0, len(tok), (5, 32))  # 5 sequences x 4 segments
    for negatives, count in (("batch", 20), ("sequence", 4)):
        _, metrics = tiny_model(tok, f"cpc.negatives={negatives}")({"input_ids": ids})
        assert float(metrics["chance"]) == pytest.approx(1 / count)
        assert float(metrics["loss_k1"]) == pytest.approx(math.log(count), abs=1e-5)  # zero W_k: uniform


def test_latent_std_detects_collapse():
    healthy = F.normalize(torch.randn(4000, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert float(latent_std(healthy)) == pytest.approx(1 / 8, rel=0.05)
    collapsed = F.normalize(torch.ones(100, 64) + 1e-4 * torch.randn(100, 64), dim=-1)
    assert float(latent_std(collapsed)) < 1e-4


# ----------------------------------------------------------------------------- bad settings


@pytest.mark.parametrize("override, words", [
    ("data.block_size=30", ["data.block_size=30", "multiple of cpc.segment_len=8", "32", "24"]),
    ("cpc.prediction_steps=4", ["cpc.prediction_steps=4", "5 segments"]),
    ("cpc.negatives=memory", ["cpc.negatives", "batch or sequence"]),
])
def test_bad_cpc_settings_give_one_clear_line(tok, override, words):
    with pytest.raises(UserError) as e:
        tiny_model(tok, override)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_block_size_fails_before_any_step(tmp_path):
    with pytest.raises(UserError, match="not a multiple of cpc.segment_len"):  # when the recipe is read
        train(load_config(RECIPE, TINY_CPC + ["data.block_size=36", f"train.output_dir={tmp_path}"]))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("name", ["cpc_tiny", "cpc_base"])
def test_recipes_parse_and_fit_cpc(name):
    """cpc_base is never run here (it streams from the Hub); it must still be a valid recipe."""
    cfg = load_config(ROOT / "recipes" / f"{name}.yaml")
    assert cfg.objective == "cpc" and cfg.model.family == "bert"
    check_cpc_config(cfg.model, cfg.cpc, cfg.data.block_size)


# ----------------------------------------------------------------------------- training


def test_cpc_tiny_trains_two_steps_and_reloads(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(RECIPE, TINY_CPC + [f"train.output_dir={out}", "train.max_steps=2", "data.eval_blocks=8"])
    result = train(cfg)
    assert result["step"] == 2 and math.isfinite(result["eval_loss"])
    assert "eval_acc_k1" in result and "eval_z_std" in result
    assert "offset k" in result["report"] and "chance" in result["report"]
    model, cfg2, tok = load_run(out)
    assert cfg2.objective == "cpc" and isinstance(model, CPC)
    assert model.features({"input_ids": torch.randint(0, len(tok), (2, 32))}).shape == (2, 64)


def test_prediction_beats_chance_after_a_short_run(tmp_path):
    """About 25 s on one core: held-out k=1 accuracy ends far above chance (measured: 33% vs 12.5%)."""
    out = tmp_path / "run"
    cfg = load_config(RECIPE, TINY_CPC + [
        f"train.output_dir={out}", "data.block_size=64", "model.max_positions=64", "cpc.prediction_steps=2",
        "cpc.negatives=sequence", "cpc.temperature=1.0", "train.max_steps=300", "train.micro_batch_size=16",
        "data.eval_blocks=64", "train.eval_every=0", "train.save_every=0", "train.log_every=25",
        "optim.lr=3e-3", "optim.warmup_steps=20"])
    result = train(cfg)
    rows = [r for r in read_log(out / "log.jsonl") if r.get("kind") != "eval"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1, (rows[0]["loss"], rows[-1]["loss"])
    chance = result["eval_chance"]
    assert chance == pytest.approx(1 / 8)  # 64-token blocks: 8 segments, the query's own sequence
    assert result["eval_loss"] < math.log(8) - 0.15
    assert result["eval_acc_k1"] > 2 * chance, result
    assert result["eval_z_std"] > 0.02  # not collapsed (healthy ~ 1/sqrt(64) = 0.125)
