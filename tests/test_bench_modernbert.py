"""`lmssl bench modernbert`: lmssl's ModernBERT masked LM against ModernBertForMaskedLM of the same shape
(a two-round smoke run, not a timing assertion)."""

from __future__ import annotations

from tests.test_bench import smoke


def test_bench_modernbert_smoke(tmp_path):
    r = smoke(tmp_path, "modernbert", 2, 32)
    assert r["reference"]["name"] == "ModernBertForMaskedLM" and r["config"]["family"] == "modernbert"
    assert r["lmssl"]["params"] == r["reference"]["params"]  # the same shape, the export's config
    assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and len(r["ratios"]) == 2
    for side in ("lmssl", "reference"):
        assert r[side]["tokens_per_s"] > 0 and r[side]["final_loss"] < 9.0  # from ln(8192) = 9.01 on one batch
