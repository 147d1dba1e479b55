"""`lmssl bench modernbert`: lmssl's ModernBERT masked LM against ModernBertForMaskedLM of the same shape
(a two-round smoke run, not a timing assertion)."""

from __future__ import annotations

import json

from lmssl.cli import main


def test_bench_modernbert_smoke(tmp_path):
    out = tmp_path / "modernbert.json"
    code = main(["bench", "modernbert", "--size", "tiny", "--device", "cpu", "--rounds", "2", "--steps-per-round", "1",
                 "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["reference"]["name"] == "ModernBertForMaskedLM" and r["config"]["family"] == "modernbert"
    assert r["lmssl"]["params"] == r["reference"]["params"]  # the same shape, the export's config
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and len(r["ratios"]) == 2
    for side in ("lmssl", "reference"):
        assert r[side]["tokens_per_s"] > 0 and r[side]["final_loss"] < 9.0  # from ln(8192) = 9.01 on one batch
