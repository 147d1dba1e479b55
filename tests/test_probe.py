"""Linear probe: runs on a tiny trained run (bundled task and user files), pads batches
without changing features, uses an objective's own features when it has them, and turns
a bad run directory into one error line."""

from __future__ import annotations

import json

import pytest
import torch

from lmssl.cli import main as cli_main
from lmssl.config import load_config
from lmssl.data.tokenizer import load_tokenizer
from lmssl.probe import describe_features, encode_texts, extract_features, probe_run, train_probe
from lmssl.objectives import build
from lmssl.runs import load_run
from lmssl.train.loop import train
from tests.conftest import ROOT, TINY


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "clm"
    cfg = load_config(ROOT / "recipes" / "gpt_tiny.yaml",
                      TINY + [f"train.output_dir={out}", "train.max_steps=30", "train.eval_every=0",
                              "train.save_every=0", "train.sample_tokens=2", "data.eval_blocks=8"])
    train(cfg)
    return out


def test_probe_scores_run_and_random_features(clm_run):
    r = probe_run(str(clm_run), seeds=[0, 1], log=lambda msg: None)
    assert r["objective"] == "clm" and "causal" in r["feature"]
    assert r["n_train"] == 3000 and r["n_validation"] == 477 and len(r["classes"]) == 6 and r["dim"] == 64
    for key in ("run", "random"):
        assert len(r[key]) == 2 and all(0.0 <= a <= 1.0 for a in r[key])
        assert r[f"{key}_mean"] == pytest.approx(sum(r[key]) / 2)
    assert 0 < r["majority"] < 1
    assert "run features" in r["table"] and "random init" in r["table"]
    # the features of a 6-class task carry signal even after 30 steps: well above a uniform guess
    assert r["run_mean"] > 1 / 6 + 0.1
    # the k-NN score on the same features, without training: above a uniform guess too
    assert r["knn_k"] == 20 and r["knn_run"] > 1 / 6 and 0.0 <= r["knn_random"] <= 1.0 and "k-NN" in r["table"]


def test_probe_command_with_user_files(clm_run, tmp_path, capsys):
    rows = [{"text": f"{w} " * (3 + i % 5), "label": w} for i in range(40) for w in ("alpha", "omega")]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:60]))
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[60:]))
    code = cli_main(["probe", str(clm_run), "--seeds", "3", "--train-file", str(tmp_path / "train.jsonl"),
                     "--validation-file", str(tmp_path / "val.jsonl")])
    out = capsys.readouterr().out
    assert code == 0 and "2 classes, 60 train / 20 validation" in out
    saved = json.loads((clm_run / "probe.json").read_text())  # read by lmssl export for the model card
    assert saved["step"] == 30 and saved["table"] in out
    assert cli_main(["export", str(clm_run), str(tmp_path / "exported")]) == 0
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "Linear probe and k-NN" in card and saved["table"] in card
    rows = [line.split() for line in out.splitlines()]
    assert ["3"] == [r[0] for r in rows if r and r[0] == "3"]  # one seed row
    knn = next(r for r in rows if r and r[0] == "k-NN")  # the k-NN row: run and random-init accuracy
    assert all(0.0 <= float(v.rstrip("%")) <= 100.0 for v in knn[1:3])


def test_bad_run_dir_is_one_error_line(tmp_path, capsys):
    code = cli_main(["probe", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "not an lmssl run directory" in err and "train.output_dir" in err


def test_batched_features_equal_one_text_at_a_time(clm_run):
    model, cfg, tok = load_run(clm_run)
    fn = model.features
    ids = encode_texts(tok, ["In the beginning", "And God said, Let there be light: and there was light.", "Amen"],
                       cfg.data.block_size)
    assert all(row[0] == tok.eos_token_id for row in ids)
    batched = extract_features(fn, ids, tok.pad_token_id)
    single = torch.cat([extract_features(fn, [row], tok.pad_token_id) for row in ids])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


def test_objective_features_are_preferred():
    tok = load_tokenizer("default")
    cfg = load_config(ROOT / "recipes" / "cpc_tiny.yaml",
                      [o for o in TINY if not o.startswith("model.preset=")] + ["cpc.prediction_steps=2"])
    cfg.model.vocab_size = len(tok)
    model = build(cfg, tok)
    assert "context vectors" in describe_features(model)


def test_probe_learns_a_separable_task():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (300,), generator=g)
    x = torch.randn(300, 16, generator=g) + 5.0 * torch.nn.functional.one_hot(y, 16).float()
    assert train_probe(x[:200], y[:200], x[200:], y[200:], seed=0) > 0.95


def test_probe_of_an_image_run_uses_its_labelled_folders(tmp_path, capsys):
    """An MAE run is probed on the labels of its own image folders (one sub-folder per class)."""
    from tests.data.test_images import write_images
    from tests.objectives.test_mae import SMALL

    write_images(tmp_path / "imgs", 64, size=(32, 32))  # class = the direction of each image's ramp
    run = tmp_path / "run"
    train(load_config(None, SMALL + ["objective=mae", f"data.train_files={tmp_path / 'imgs'}", f"train.output_dir={run}",
                                     "data.validation_fraction=0.25", "train.max_steps=5", "train.micro_batch_size=16",
                                     "train.progress=false"]))
    r = probe_run(str(run), seeds=[0, 1], log=lambda m: None)
    assert (r["unit"], r["n_train"], r["n_validation"], r["classes"]) == ("images", 48, 16, ["class0", "class1"])
    assert r["dim"] == 64 and len(r["run"]) == len(r["random"]) == 2
    assert r["run_mean"] > r["majority"] + 0.2  # the ramp's direction is readable from the features
    assert "validation images" in r["table"] and "raw pixels" in r["table"]
    assert r["rows"]["raw pixels"]["knn"] > r["majority"] + 0.2  # the honest floor reads the ramp too
    assert r["few_labels"] == 10 and len(r["few"]["run features"]["linear"]) == 2
    assert cli_main(["probe", str(run), "--train-file", str(ROOT / "README.md")]) == 2
    assert "are for text runs" in capsys.readouterr().err
