import json

from lmssl.config import load_config
from lmssl.runs import load_run
from lmssl.train.loop import train
from lmssl.train.log import read_log
from tests.conftest import ROOT


def test_tiny_gpt_learns_and_writes_its_run(tmp_path, tiny):
    out = tmp_path / "run"
    cfg = load_config(ROOT / "recipes" / "gpt_tiny.yaml",
                      tiny + [f"train.output_dir={out}", "train.max_steps=40", "train.eval_every=20",
                              "train.save_every=20", "train.sample_tokens=8"])
    result = train(cfg)
    rows = [r for r in read_log(out / "log.jsonl") if r.get("kind") != "eval"]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 1.5, (first, last)  # from ~ln(8192)=9 down
    assert result["eval_loss"] < first - 1.5
    assert 0 < result["eval_bits_per_byte"] < 4 and result["eval_perplexity"] > 1
    assert all(k in rows[-1] for k in ("tokens_per_s", "mfu", "tflops", "lr"))
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000020", "step_0000040"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000040"
    assert result["report"].startswith("And God said")
    assert json.loads((out / "final_metrics.json").read_text())["step"] == 40
    model, cfg2, tok = load_run(out)
    assert cfg2.model.dim == 64 and cfg2.model.vocab_size == len(tok)


def test_llama_preset_trains_with_activation_checkpointing(tmp_path, tiny):
    cfg = load_config(None, tiny + ["train.activation_checkpointing=true", "model.preset=llama_tiny", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
                                    "model.n_kv_heads=2", "model.mlp_hidden=128", "model.max_positions=64",
                                    f"train.output_dir={tmp_path}", "train.max_steps=25", "train.eval_every=0",
                                    "train.save_every=0", "train.sample_tokens=4"])
    train(cfg)
    rows = [r for r in read_log(tmp_path / "log.jsonl") if r.get("kind") != "eval"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
