"""data.tokenizer=auto (a tokenizer trained on the run's own data, kept in RUN_DIR/tokenizer/)
and the note a run gets when it keeps the default tokenizer on data it fits badly."""

from __future__ import annotations

import json

import pytest

from lmssl.config import load_config
from lmssl.data.text import CORPUS_DIR
from lmssl.data.tokenizer import AUTO_RECORD, FIT_WARNING_RATIO, load_tokenizer, resolve_tokenizer
from lmssl.errors import UserError
from lmssl.train.loop import train
from tests.conftest import ROOT, TINY

# modern English that is not the bundled corpus: lmssl's own README (prose and code)
OTHER_TEXT = ROOT / "README.md"


def corpus(folder, lines: int = 300) -> list[str]:
    """A small corpus made of the head of the bundled text."""
    folder.mkdir(parents=True, exist_ok=True)
    overrides = []
    for split in ("train", "validation"):
        path = folder / f"{split}.txt"
        text = (CORPUS_DIR / f"kjv_{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(text[:lines]), encoding="utf-8")
        overrides.append(f"data.{split}_files=[{path}]")
    return overrides


def auto_config(out, data, *extra):
    return load_config(None, TINY + data + ["data.tokenizer=auto", "data.tokenizer_vocab_size=400",
                                            "model.dim=32", "model.n_layers=1", "data.block_size=16",
                                            "data.eval_blocks=2", "train.sample_tokens=2", f"train.output_dir={out}",
                                            *extra])


def test_auto_trains_in_the_run_folder_reuses_it_on_resume_and_the_export_ships_it(tmp_path):
    from transformers import AutoTokenizer

    from lmssl.export.core import export_run
    from lmssl.runs import load_run

    data, out = corpus(tmp_path / "corpus"), tmp_path / "run"
    lines: list[str] = []
    cfg = auto_config(out, data, "train.max_steps=2")
    train(cfg)
    folder = out / "tokenizer"
    record = json.loads((folder / AUTO_RECORD).read_text())
    assert record["settings"]["vocab_size"] == 400 and record["documents"] > 0
    tok = load_tokenizer(folder)
    assert len(tok) == 400 and cfg.model.vocab_size == 400 and tok.mask_token == "<mask>"
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns

    # resume: the same folder, not retrained (no training line, file untouched)
    again = auto_config(out, data, "train.max_steps=3")
    got = resolve_tokenizer(again, out, lines.append)
    assert not any("trained" in line for line in lines)
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp and len(got) == 400
    assert train(again)["step"] == 3
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp

    # the run's readers load it, and the export ships it
    _, _, run_tok = load_run(out)
    text = "And the LORD spake unto Moses, saying"
    assert run_tok(text)["input_ids"] == tok(text)["input_ids"]
    export_run(out, tmp_path / "export", log=lambda m: None)
    assert AutoTokenizer.from_pretrained(tmp_path / "export")(text)["input_ids"] == tok(text)["input_ids"]

    # other data settings under the same checkpoints: refused, never silently retrained
    changed = auto_config(out, data, "train.max_steps=3", "data.tokenizer_vocab_size=500")
    with pytest.raises(UserError, match="holds checkpoints"):
        resolve_tokenizer(changed, out, lines.append)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="restore"):
        load_run(out)


def test_the_default_tokenizer_on_other_data_gets_one_note_naming_the_fix(tmp_path):
    notes: list[str] = []
    other = load_config(None, [f"data.train_files=[{OTHER_TEXT}]"])
    resolve_tokenizer(other, tmp_path / "a", notes.append)
    assert len(notes) == 1 and "data.tokenizer=auto" in notes[0] and "bytes per token" in notes[0]

    notes.clear()
    bundled_files = load_config(None, [f"data.train_files=[{CORPUS_DIR / 'kjv_train.txt'}]"])
    resolve_tokenizer(bundled_files, tmp_path / "b", notes.append)
    resolve_tokenizer(load_config(None, []), tmp_path / "c", notes.append)  # the bundled corpus itself
    resolve_tokenizer(other, tmp_path / "d", notes.append, may_train=False)  # readers of a run: no measuring
    assert notes == []
    assert 0.5 < FIT_WARNING_RATIO < 1.0
