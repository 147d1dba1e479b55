"""`lmssl finetune`: tiny runs exported on the fly, fine-tuned through transformers."""

from __future__ import annotations

import csv
import json

import pytest

from lmssl.cli import main
from lmssl.finetune import FinetuneConfig, classification_metrics, finetune, load_finetune_config
from lmssl.train.log import read_log
from tests.conftest import ROOT
from tests.export._runs import pretrain

GENRE = ROOT / "lmssl" / "data" / "corpus"


def _rows(split: str, n: int) -> list[dict]:
    """``n`` passages of the bundled task, every class represented."""
    rows = [json.loads(line) for line in (GENRE / f"genre_{split}.jsonl").read_text().splitlines()]
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    out = []
    while len(out) < n:
        for label in sorted(by_label):
            if len(out) < n:
                out.append(by_label[label].pop())
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("ft") / "run", "gpt2", steps=2)


def test_finetune_a_run_end_to_end(gpt_run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, pipeline

    train = _jsonl(tmp_path / "train.jsonl", _rows("train", 48))
    val = _jsonl(tmp_path / "val.jsonl", _rows("validation", 24))
    out = tmp_path / "ft"
    assert main(["finetune", str(gpt_run), "--train-file", str(train), "--validation-file", str(val),
                 "--output-dir", str(out), "--max-steps", "12", "--eval-every", "6", "--batch-size", "8",
                 "--lr", "3e-3", "--max-length", "32", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "exporting lmssl run" in printed and "GPT2ForSequenceClassification" in printed and "accuracy" in printed
    assert (out / "base_model" / "config.json").is_file()  # the run, exported and verified
    log = read_log(out / "log.jsonl")
    train_rows = [r for r in log if r.get("kind") != "eval"]
    evals = [r for r in log if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and 0.0 <= r["eval_macro_f1"] <= 1.0 for r in evals)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]  # 12 steps on 48 passages: the loss falls
    assert (out / "loss_curve.png").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["best"]["accuracy"] == max(r["eval_accuracy"] for r in evals)

    model = AutoModelForSequenceClassification.from_pretrained(out / "best")
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.num_labels == 6 and model.config.pad_token_id == 1
    assert sorted(model.config.label2id) == ["epistles", "gospels", "history", "law", "prophets", "wisdom"]
    pred = pipeline("text-classification", model=str(out / "best"))("And Jesus said unto his disciples")
    assert pred[0]["label"] in model.config.label2id
    assert json.loads((out / "best" / "eval_results.json").read_text())["step"] in (6, 12)


def test_csv_held_out_split_scratch_and_resume(gpt_run, tmp_path):
    """String labels from a CSV, validation held out of train, --from-scratch, epoch resume."""
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["passage", "division"])
        w.writeheader()
        for r in _rows("train", 40):
            w.writerow({"passage": r["text"], "division": r["label"]})
    common = dict(model=str(gpt_run), train_file=str(path), text_column="passage", label_column="division",
                  validation_fraction=0.2, output_dir=str(tmp_path / "ft"), from_scratch=True, batch_size=8,
                  max_length=24, lr=1e-3, progress=False, patience=0)
    first = finetune(load_finetune_config(None, {**common, "epochs": 1}), log=lambda m: None)
    assert first["steps"] == 4  # 32 training passages / 8
    state = json.loads((tmp_path / "ft" / "last" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["step"] == 4
    again = finetune(load_finetune_config(None, {**common, "epochs": 2, "resume": True}), log=lambda m: None)
    assert again["steps"] == 8
    evals = [r["step"] for r in read_log(tmp_path / "ft" / "log.jsonl") if r.get("kind") == "eval"]
    assert evals == [4, 8]
    with pytest.raises(Exception, match="differs from the run"):
        finetune(load_finetune_config(None, {**common, "epochs": 3, "resume": True, "lr": 5e-4}), log=lambda m: None)


def test_token_classification(gpt_run, tmp_path):
    from transformers import AutoModelForTokenClassification

    words = "And God said Let there be light and there was light".split()
    rows = [{"tokens": words[i:] + words[:i], "tags": ["CAP" if w[0].isupper() else "low" for w in words[i:] + words[:i]]}
            for i in range(len(words))]
    train = _jsonl(tmp_path / "train.jsonl", rows * 3)
    val = _jsonl(tmp_path / "val.jsonl", rows[:4])
    result = finetune(load_finetune_config(None, dict(
        model=str(gpt_run), task="token", train_file=str(train), validation_file=str(val), text_column="tokens",
        label_column="tags", output_dir=str(tmp_path / "ft"), max_steps=4, batch_size=8, lr=3e-3,
        progress=False)), log=lambda m: None)
    assert 0.0 <= result["best"]["accuracy"] <= 1.0
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "ft" / "best")
    assert sorted(model.config.label2id) == ["CAP", "low"]


def test_finetune_errors_are_one_line(gpt_run, tmp_path, capsys):
    train = _jsonl(tmp_path / "train.jsonl", _rows("train", 12))
    assert main(["finetune", str(gpt_run), "--train-file", str(train), "--label-column", "genre",
                 "--output-dir", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'genre'" in err[0] and "--label-column" in err[0]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert main(["finetune", str(gpt_run), "--output-dir", str(tmp_path / "b"), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not written by `lmssl finetune`" in err[0]
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    assert main(["finetune"]) == 2
    assert "no model given" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "nowhere" / "run")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_recipe_and_metrics():
    cfg = load_finetune_config(str(ROOT / "recipes" / "finetune_tiny.yaml"), {"epochs": 1})
    assert cfg.model == "runs/gpt_tiny" and cfg.train_file == "" and cfg.epochs == 1
    assert cfg.output_dir == "runs/gpt_tiny_genre"
    assert load_finetune_config(None, {"model": "x", "from_scratch": True}).output_dir == "runs/finetune-x-scratch"
    with pytest.raises(Exception, match="did you mean"):
        load_finetune_config(None, {"model": "x", "epoch": 2})
    import numpy as np

    m = classification_metrics(np.array([0, 1, 1, 2, -5]), np.array([0, 1, 2, 2, -100]))
    assert m["accuracy"] == 0.75 and abs(m["macro_f1"] - (1 + 2 / 3 + 2 / 3) / 3) < 1e-9
    assert set(FinetuneConfig().__dict__) >= {"model", "task", "from_scratch", "patience", "metric"}


# The gpt_tiny shape (4 x 256, 5.3M parameters) at half its block size. Measured on 2 cores:
# after 300 steps (held-out loss 4.79) fine-tuning on 300 passages reaches 46.8% / 42.1% / 47.0%
# (seeds 0 / 1 / 2) against 35.2% / 27.7% / 34.6% from scratch (6 classes, chance 16.7%). The
# 2-layer 64-wide model the other tests use does not transfer: at that size scratch wins.
TRANSFER_MODEL = ["model.dim=256", "model.n_layers=4", "model.n_heads=4", "model.max_positions=128",
                  "data.block_size=64", "train.micro_batch_size=16", "optim.lr=1e-3", "optim.warmup_steps=20",
                  "train.log_every=50"]


@pytest.mark.slow
def test_pretrained_beats_scratch_on_the_bundled_task(tmp_path):
    """300 steps of pretraining on the bundled corpus (about 2 minutes), then the same
    fine-tuning (300 labelled passages, 4 epochs, seed 0) from those weights and from fresh ones."""
    run = pretrain(tmp_path / "run", "gpt2", steps=300, full_corpus=True, extra=TRANSFER_MODEL)
    common = dict(model=str(run), max_train_examples=300, epochs=4, batch_size=32, lr=1e-3, max_length=48,
                  patience=0, seed=0, progress=False)
    pre = finetune(load_finetune_config(None, {**common, "output_dir": str(tmp_path / "pre")}), log=print)
    scratch = finetune(load_finetune_config(None, {**common, "output_dir": str(tmp_path / "scratch"),
                                                   "from_scratch": True}), log=print)
    print("pretrained", pre["best"], "scratch", scratch["best"])
    assert pre["best"]["accuracy"] > scratch["best"]["accuracy"] + 0.05, (pre["best"], scratch["best"])
