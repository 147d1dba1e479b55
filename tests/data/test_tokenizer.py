"""Tokenizer training, reloading, measuring and the shipped default tokenizer.

Each model is trained once (module fixtures) on a slice of the bundled corpus with a
small vocabulary, saved, and reloaded with stock ``AutoTokenizer``.
"""

from __future__ import annotations

import argparse
import json
import tracemalloc
from pathlib import Path

import pytest

from lmssl.data.files import resolve_files
from transformers import AutoTokenizer

from lmssl.data import tokenizer as T
from lmssl.errors import UserError

CORPUS = Path(T.__file__).resolve().parent / "corpus"
KJV_TRAIN = CORPUS / "kjv_train.txt"
KJV_VALIDATION = CORPUS / "kjv_validation.txt"
GENRE_TRAIN = CORPUS / "genre_train.jsonl"

TRAIN_LINES = {"bpe": 300, "unigram": 120, "wordpiece": 300}  # unigram (EM) trains slowest
VOCAB = 600
ROLE_IDS = {"eos": 0, "bos": 0, "pad": 1, "unk": 2, "mask": 3, "cls": 4, "sep": 5}


def held_out_sentence() -> str:
    """The first ~400 characters of a validation chapter, cut at a space."""
    with open(KJV_VALIDATION, encoding="utf-8") as f:
        chapter = f.readline()
    return chapter[:400].rsplit(" ", 1)[0]


@pytest.fixture(scope="module", params=T.MODELS)
def trained(request, tmp_path_factory):
    """(model name, output folder) for a tokenizer trained on a slice of the corpus."""
    model = request.param
    out = tmp_path_factory.mktemp(f"tok_{model}")
    T.train_tokenizer([str(KJV_TRAIN)], VOCAB, model, out, max_lines=TRAIN_LINES[model])
    return model, out


# ----------------------------------------------------------------------------------
# Training and reloading


def test_reload_has_special_tokens_at_ids_0_to_5(trained):
    model, out = trained
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_ids_to_tokens(list(range(6))) == list(T.SPECIAL_TOKENS)
    for role, token_id in ROLE_IDS.items():
        assert getattr(tok, f"{role}_token_id") == token_id, role
    assert tok.eos_token == tok.bos_token == "<|endoftext|>"
    if model == "bpe":
        assert len(tok) == VOCAB
    else:
        assert 300 < len(tok) <= VOCAB


def test_encoding_adds_no_special_tokens(trained):
    _, out = trained
    tok = AutoTokenizer.from_pretrained(out)
    text = held_out_sentence()
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert tok("<|endoftext|>")["input_ids"] == [0]  # the separator lmssl packs with is one token


def test_round_trip_on_held_out_text(trained):
    model, out = trained
    tok = AutoTokenizer.from_pretrained(out)
    text = held_out_sentence()
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    decoded = tok.decode(ids)
    if model == "wordpiece":  # cased, but punctuation comes back space-separated ("Shinar ; and")
        assert "".join(decoded.split()) == "".join(text.split())
    else:
        assert decoded == text


@pytest.mark.parametrize("text", ["naïve café — 日本語 🙂", "two  spaces,\ttab and\nnewline"])
def test_byte_models_are_lossless_beyond_their_training_alphabet(trained, text):
    model, out = trained
    if model == "wordpiece":
        pytest.skip("wordpiece maps unseen characters to <unk> and normalises whitespace")
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_saved_config_loads_as_plain_fast_tokenizer(trained):
    _, out = trained
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4.x also knows
    assert json.loads((out / "tokenizer.json").read_text())["post_processor"] in (None, _no_op_template())


def _no_op_template() -> dict:
    """The post-processor transformers 5 writes when no bos/eos is added: the text alone."""
    return {
        "type": "TemplateProcessing",
        "single": [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {},
    }


def test_unigram_segments_like_sentencepiece():
    import sentencepiece as spm

    specials = list(T.SPECIAL_TOKENS)
    proto = T._train_sentencepiece(T.iter_texts(KJV_TRAIN, max_lines=60), 400, specials)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    converted = T._unigram_from_sentencepiece(proto, specials)
    for text in [held_out_sentence(), "Zebedee's ẞ 𝔘 unseen letters", "a  b\nc"]:
        assert converted.encode(text).ids == sp.encode(text), text


def test_stats_are_sane(trained):
    _, out = trained
    tok = AutoTokenizer.from_pretrained(out)
    stats = T.tokenizer_stats(tok, KJV_VALIDATION, max_lines=10)
    assert stats["documents"] == 10
    assert stats["vocab_size"] == len(tok)
    assert 1.0 < stats["bytes_per_token"] < 8.0
    assert 1.0 <= stats["tokens_per_word"] < 4.0
    assert stats["unk_fraction"] < 0.01
    from_texts = T.tokenizer_stats(tok, ["In the beginning", "God created the heaven and the earth."])
    assert from_texts["documents"] == 2 and from_texts["words"] == 10


def test_pad_to_multiple_of_rounds_the_vocab_up(tmp_path):
    tok = T.train_tokenizer(KJV_TRAIN, 500, "bpe", tmp_path, max_lines=100, pad_to_multiple_of=64)
    assert len(tok) == 512
    assert len(AutoTokenizer.from_pretrained(tmp_path)) == 512


def test_jsonl_folder_and_glob_inputs(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    with open(GENRE_TRAIN, encoding="utf-8") as src, open(folder / "a.jsonl", "w", encoding="utf-8") as dst:
        for _, line in zip(range(150), src):
            record = json.loads(line)
            dst.write(json.dumps({"body": record["text"]}) + "\n")
    (folder / "b.txt").write_text("And God said, Let there be light.\n\n   \nand there was light.\n", encoding="utf-8")
    (folder / "notes.pdf").write_text("ignored: not a text kind\n", encoding="utf-8")

    assert resolve_files(folder) == [str(folder / "a.jsonl"), str(folder / "b.txt")]
    assert resolve_files(str(folder / "*.txt")) == [str(folder / "b.txt")]
    assert list(T.iter_texts(folder / "b.txt")) == ["And God said, Let there be light.", "and there was light."]

    tok = T.train_tokenizer([str(folder)], 400, "wordpiece", tmp_path / "out", text_column="body")
    assert tok.convert_ids_to_tokens(list(range(6))) == list(T.SPECIAL_TOKENS)
    with pytest.raises(UserError, match="--text-column"):
        T.train_tokenizer([str(folder / "a.jsonl")], 400, "bpe", tmp_path / "out2")  # no "text" field


# ----------------------------------------------------------------------------------
# Streaming


def test_reading_streams_line_by_line():
    """Iterating the 3.9 MB training file never holds more than a few lines in memory."""
    size = KJV_TRAIN.stat().st_size
    texts = T.iter_texts(KJV_TRAIN)
    assert iter(texts) is texts  # an iterator, not a list
    tracemalloc.start()
    try:
        n = sum(1 for _ in texts)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 1130
    assert peak < size / 10, f"peak {peak} bytes while reading a {size}-byte file"


def test_reading_stops_at_max_lines(tmp_path):
    """Lines after max_lines are never read: a broken line there raises nothing."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)) + "{broken\n")
    assert list(T.iter_texts(path, max_lines=5)) == [f"doc {i}" for i in range(5)]
    with pytest.raises(UserError, match="line 6 is not valid JSON"):
        list(T.iter_texts(path))


def test_long_lines_are_cut_at_spaces_for_sentencepiece():
    text = " ".join(f"word{i}" for i in range(3000))  # ~26 KB, one line
    pieces = list(T._spm_sentences([text], limit=1000))
    assert len(pieces) > 20
    assert all(len(p.encode()) <= 1000 for p in pieces)
    assert " ".join(pieces) == text


# ----------------------------------------------------------------------------------
# The shipped default


def test_default_tokenizer_loads_with_8192_entries():
    assert (T.default_tokenizer_path() / "tokenizer.json").is_file()
    tok = T.load_tokenizer("default")
    assert len(tok) == 8192
    assert tok.convert_ids_to_tokens(list(range(6))) == list(T.SPECIAL_TOKENS)
    text = held_out_sentence()
    assert tok.decode(tok(text)["input_ids"]) == text
    assert T.tokenizer_stats(tok, KJV_VALIDATION, max_lines=5)["bytes_per_token"] > 3.0


def test_load_tokenizer_accepts_a_folder_and_rejects_a_missing_one(trained, tmp_path):
    _, out = trained
    assert len(T.load_tokenizer(str(out))) > 300
    with pytest.raises(UserError, match="does not exist"):
        T.load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="no loadable tokenizer"):
        T.load_tokenizer(str(tmp_path))  # exists, but empty


# ----------------------------------------------------------------------------------
# Bad input: one clear UserError


def test_bad_inputs_raise_user_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    cases = [
        (dict(files=[str(tmp_path / "*.nothing")], vocab_size=500, model="bpe"), "no files match"),
        (dict(files=[str(tmp_path / "missing.txt")], vocab_size=500, model="bpe"), "does not exist"),
        (dict(files=[str(empty)], vocab_size=500, model="bpe"), "is empty"),
        (dict(files=[str(blank)], vocab_size=500, model="unigram"), "no text found"),
        (dict(files=[str(KJV_TRAIN)], vocab_size=500, model="sentencepiece"), "unknown tokenizer model"),
        (dict(files=[str(KJV_TRAIN)], vocab_size=299, model="bpe"), "at least 300"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as info:
            T.train_tokenizer(out_dir=tmp_path / "out", max_lines=20, **kwargs)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing written when training fails


# ----------------------------------------------------------------------------------
# Command line


def test_cli_train_prints_a_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="lmssl tokenizer")
    T.add_arguments(parser)
    args = parser.parse_args(
        ["train", "--files", str(KJV_TRAIN), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
         "--validation-files", str(KJV_VALIDATION), "--max-lines", "100"]
    )
    assert args.model == "bpe" and args.text_column == "text" and args.min_frequency == 2
    assert T.run(args) == 0
    out = capsys.readouterr().out
    assert "vocab 400" in out and "bytes/token" in out and "tokens/word" in out
    assert len(AutoTokenizer.from_pretrained(tmp_path / "tok")) == 400


def test_cli_rejects_a_missing_validation_file_before_training(tmp_path):
    parser = argparse.ArgumentParser(prog="lmssl tokenizer")
    T.add_arguments(parser)
    args = parser.parse_args(
        ["train", "--files", str(KJV_TRAIN), "--out", str(tmp_path / "tok"),
         "--validation-files", str(tmp_path / "no.txt")]
    )
    with pytest.raises(UserError, match="does not exist"):
        T.run(args)
    assert not (tmp_path / "tok").exists()
