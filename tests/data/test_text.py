import numpy as np
import pytest

from lmssl.config import load_config
from lmssl.data.batches import build_text_data, micro_batch
from lmssl.data.text import PackedBlocks, StreamingBlocks, tokenize_corpus
from lmssl.data.tokenizer import load_tokenizer
from lmssl.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("default")


def write_docs(path, n=200):
    lines = [f"Document number {i} says that the word {i % 7} is good and the light is {i % 3}." for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return lines


def test_packing_separates_documents_with_eos(tmp_path, tok):
    lines = write_docs(tmp_path / "a.txt", 40)
    cfg = load_config(None, [f"data.train_files={tmp_path}/a.txt", "data.validation_fraction=0.1",
                             "data.block_size=16", "model.max_positions=64"])
    tf = tokenize_corpus(cfg.data, tok, "train")
    n_eos = int((np.asarray(tf.tokens) == tok.eos_token_id).sum())
    assert n_eos == len(tf.offsets) - 1 == 36  # every 10th document held out
    first = tok.decode(np.asarray(tf.tokens[: tf.offsets[1] - 1]).tolist())
    assert first == lines[1]  # document 0 went to validation
    blocks = PackedBlocks(tf, 16)
    assert len(blocks) == len(tf.tokens) // 16
    assert blocks.batch(np.array([0, 1]))["input_ids"].shape == (2, 16)
    val = tokenize_corpus(cfg.data, tok, "validation")
    assert len(val.offsets) - 1 == 4


def test_second_run_reads_the_cache_and_an_edit_invalidates_it(tmp_path, tok):
    write_docs(tmp_path / "a.txt")
    cfg = load_config(None, [f"data.train_files={tmp_path}/a.txt", "data.block_size=16"])
    a = tokenize_corpus(cfg.data, tok, "train")
    b = tokenize_corpus(cfg.data, tok, "train")
    assert isinstance(b.tokens, np.memmap) and b.tokens.filename == a.tokens.filename
    write_docs(tmp_path / "a.txt", 100)
    c = tokenize_corpus(cfg.data, tok, "train")
    assert c.tokens.filename != a.tokens.filename and len(c.tokens) < len(a.tokens)


def test_jsonl_csv_parquet_and_text_column(tmp_path, tok):
    import datasets

    lines = write_docs(tmp_path / "ref.txt", 60)
    ds = datasets.Dataset.from_dict({"body": lines, "id": list(range(60))})
    ds.to_json(str(tmp_path / "d.jsonl"))
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    counts = set()
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        cfg = load_config(None, [f"data.train_files={tmp_path}/{name}", "data.text_column=body", "data.block_size=16"])
        counts.add(len(tokenize_corpus(cfg.data, tok, "train").tokens))
    assert len(counts) == 1


def test_unpacked_batches_are_padded_with_a_mask(tmp_path, tok):
    write_docs(tmp_path / "a.txt", 30)
    cfg = load_config(None, [f"data.train_files={tmp_path}/a.txt", "data.packing=false", "data.block_size=64"])
    blocks = PackedBlocks(tokenize_corpus(cfg.data, tok, "train"), 64, packing=False, pad_id=tok.pad_token_id)
    b = blocks.batch(np.array([0, 5, 11]))
    assert b["input_ids"].shape == b["attention_mask"].shape
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()


def test_global_cursor_is_independent_of_process_layout(tmp_path, tok):
    write_docs(tmp_path / "a.txt")
    one = load_config(None, [f"data.train_files={tmp_path}/a.txt", "data.block_size=16",
                             "train.micro_batch_size=4", "train.grad_accum=2"])
    two = load_config(None, [f"data.train_files={tmp_path}/a.txt", "data.block_size=16",
                             "train.micro_batch_size=4", "train.grad_accum=1"])
    data = build_text_data(one, tok)
    for cursor in (0, 8, 1000):  # 1000 crosses into later epochs
        single = [micro_batch(data, one, cursor, a, 0, 1)[0]["input_ids"] for a in range(2)]
        split = [micro_batch(data, two, cursor, 0, r, 2)[0]["input_ids"] for r in range(2)]
        assert all((s == p).all() for s, p in zip(single, split))


def test_streaming_blocks_resume_at_a_cursor(tmp_path, tok):
    write_docs(tmp_path / "a.txt", 300)
    cfg = load_config(None, [f"data.train_files={tmp_path}/a.txt", "data.block_size=16", "data.streaming=true",
                             "data.shuffle_buffer=50"])
    a = StreamingBlocks(cfg.data, tok, seed=3)
    run = a.blocks_from(0, 40)
    b = StreamingBlocks(cfg.data, tok, seed=3)
    assert (b.blocks_from(25, 15) == run[25:]).all()
    c = StreamingBlocks(cfg.data, tok, seed=4)
    assert not (c.blocks_from(0, 40) == run).all()


def test_streaming_text_column_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    cfg = load_config(None, [f"data.train_files={tmp_path}/d.jsonl", "data.streaming=true"])
    from lmssl.data.text import load_documents

    with pytest.raises(UserError, match="data.text_column"):
        load_documents(cfg.data, "train")
