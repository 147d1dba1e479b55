"""`lmssl bench`: a two-round smoke run on a laptop-of-a-laptop workload (not a timing assertion)."""

from __future__ import annotations

import json
import math

import pytest

from lmssl.cli import main


def smoke(tmp_path, family: str, batch: int, seq: int | None = None) -> dict:
    """``lmssl bench FAMILY --size tiny`` for two one-step rounds on the CPU; its JSON result."""
    out = tmp_path / f"{family}.json"
    args = ["bench", family, "--size", "tiny", "--device", "cpu", "--rounds", "2", "--steps-per-round", "1",
            "--warmup", "1", "--batch-size", str(batch), "--json", str(out)]
    assert main(args + (["--seq-len", str(seq)] if seq else [])) == 0
    return json.loads(out.read_text())


def test_bench_gpt_tiny_smoke(tmp_path, capsys):
    r = smoke(tmp_path, "gpt", 2, 32)
    assert r["ratio"] > 0 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert len(r["ratios"]) == 2
    for side in ("lmssl", "reference"):
        assert r[side]["tokens_per_s"] > 0
        # both sides start at ln(8192) = 9.01 and train on the same repeated batch: the loss must fall
        assert r[side]["final_loss"] < 8.7
    assert r["lmssl"]["final_loss"] == pytest.approx(r["reference"]["final_loss"], abs=1.0)
    assert r["lmssl"]["params"] == r["reference"]["params"]  # same shape: 8192 needs no vocabulary padding
    assert r["reference"]["name"] == "GPT2LMHeadModel"
    assert "is_causal" in r["lmssl"]["attention"] and "is_causal" in r["reference"]["attention"]
    assert r["device"] == "cpu" and r["torch"] and r["config"]["n_layers"] == 4
    assert r["data"]["tokenize_tokens_per_s"] > 0 and r["data"]["collate_s_per_batch"] > 0
    assert r["allocator"] and all(r[side]["page_faults_per_step"] >= 0 for side in ("lmssl", "reference"))
    # exact tensor bytes: at least weights, gradients and both AdamW moments (4 copies of the parameters)
    assert all(r[side]["peak_mem_bytes"] > 4 * 4 * r[side]["params"] for side in ("lmssl", "reference"))
    text = capsys.readouterr().out
    assert "lmssl / transformers throughput" in text and "minor page faults per step" in text


def test_bench_mae_smoke(tmp_path, capsys):
    """Three contenders: lmssl's MAE, ViTMAEForPreTraining and the full-sequence-encoder MAE."""
    r = smoke(tmp_path, "mae", 4)
    assert r["unit"] == "images" and r["data"]["collate_s_per_batch"] > 0 and r["data"]["image_side"] == 40
    assert r["reference"]["name"] == "ViTMAEForPreTraining" and r["baseline"]["name"] == "full-sequence encoder"
    for side in ("lmssl", "reference", "baseline"):
        assert r[side]["images_per_s"] > 0 and len(r[side]["round_s"]) == 2
        assert "bidirectional" in r[side]["attention"]
    # the same trainable weights; ViTMAE also counts its two frozen sin-cos tables as parameters
    tables = (1 + 64) * (r["config"]["dim"] + r["mae"]["decoder_dim"])
    assert r["reference"]["params"] - tables == r["lmssl"]["params"]
    assert r["baseline"]["flops_per_unit"] > 2 * r["flops_per_image"]
    assert r["baseline"]["ratio_min"] <= r["baseline"]["ratio"] <= r["baseline"]["ratio_max"]
    text = capsys.readouterr().out
    assert "lmssl / full-sequence encoder throughput" in text and "images/s" in text


def test_bench_simclr_smoke(tmp_path):
    """lmssl's SimCLR step against ViTModel + the same projector + NT-Xent written out plainly."""
    r = smoke(tmp_path, "simclr", 4)
    assert r["unit"] == "images" and r["reference"]["name"] == "ViTModelWithProjector"
    # the same trainable weights: ViTModel's position table and lmssl's class token differ by the table
    assert r["reference"]["params"] - 65 * r["config"]["dim"] == r["lmssl"]["params"]
    assert r["lmssl"]["images_per_s"] > 0 and r["reference"]["images_per_s"] > 0 and r["flops_per_image"] > 0


def test_bench_bad_args(capsys):
    assert main(["bench", "mae", "--seq-len", "64"]) == 2
    assert "--seq-len is for text models" in capsys.readouterr().err
    assert main(["bench", "gpt", "--rounds", "0"]) == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


def test_cpu_step_peak_counts_held_tensors_gradients_and_activations():
    """The CPU peak-memory figure: exact bytes held between steps, and a step's peak that
    grows with the activations of a bigger batch."""
    import contextlib

    import torch
    from torch import nn

    from lmssl.bench import Side, _held_bytes, cpu_step_peak, train_step

    torch.manual_seed(0)
    D = 256
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D))
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    side = Side("toy", model, lambda b: model(b["x"]).square().mean(), optimizer, 0)
    train_step(side, {"x": torch.randn(8, D)}, contextlib.nullcontext)  # creates the AdamW state
    params = list(model.parameters())
    weights = sum(p.numel() * 4 for p in params)
    assert _held_bytes(side) == 3 * weights + 4 * len(params)  # weights, two moments, a step count each

    small = cpu_step_peak(side, {"x": torch.randn(64, D)}, contextlib.nullcontext)
    big = cpu_step_peak(side, {"x": torch.randn(64 + 1024, D)}, contextlib.nullcontext)
    assert small >= _held_bytes(side) + weights  # the gradients are alive at the end of the step
    rows = 1024 * D * 4  # bytes of one (1024, D) float32 activation
    assert 2 * rows <= big - small <= 8 * rows  # tanh's and the last layer's outputs are kept for backward


def test_bench_electra_smoke(tmp_path, capsys):
    """lmssl's ELECTRA step against ElectraForMaskedLM + ElectraForPreTraining sharing their embeddings."""
    r = smoke(tmp_path, "electra", 2, 32)
    assert r["reference"]["name"] == "ElectraGeneratorAndDiscriminator" and r["config"]["family"] == "electra"
    # the same weights: both networks read one set of embeddings on both sides
    assert r["lmssl"]["params"] == r["reference"]["params"]
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["data"]["includes_prepare_batch"]
    # from ln(8192) = 9.01 (masked LM) + 50 x ln 2 (detection) at initialisation, on one repeated batch
    for side in ("lmssl", "reference"):
        assert r[side]["tokens_per_s"] > 0 and r[side]["final_loss"] < 9.0 + 50 * 0.6932
    assert abs(r["lmssl"]["final_loss"] - r["reference"]["final_loss"]) < 5.0
    assert "ElectraGeneratorAndDiscriminator" in capsys.readouterr().out


def test_bench_clip_smoke(tmp_path, capsys):
    """lmssl's CLIP step against CLIPModel of the same towers (its own loss)."""
    r = smoke(tmp_path, "clip", 4)
    assert r["unit"] == "images" and r["reference"]["name"] == "CLIPModel"
    # the same trainable weights but for CLIPModel's learned position table of the image tower (17 rows: the
    # class token and 16 patches; lmssl's sin-cos table is a buffer) and lmssl's patch-embedding bias (CLIP's
    # patch embedding has none; the export adds it to the position table)
    assert r["reference"]["params"] - 17 * r["config"]["dim"] + r["config"]["dim"] == r["lmssl"]["params"]
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    for side in ("lmssl", "reference"):
        assert r[side]["images_per_s"] > 0 and math.isfinite(r[side]["final_loss"])
    assert "32-token captions" in capsys.readouterr().out
