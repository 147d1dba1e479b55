"""Bad input: one clear line on stderr naming the problem and the fix, exit code 2, and
nothing already on disk lost."""

import pytest

from lmssl.cli import main
from tests.conftest import ROOT, TINY

RECIPE = str(ROOT / "recipes" / "gpt_tiny.yaml")


def pretrain(capsys, tmp_path, *overrides):
    code = main(["pretrain", RECIPE, *TINY, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
                 "train.eval_every=0", "train.sample_tokens=2", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def one_line_error(capsys, tmp_path, *overrides) -> str:
    code, err = pretrain(capsys, tmp_path, *overrides)
    errors = [line for line in err if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1, err
    return errors[0]


def test_missing_file(capsys, tmp_path):
    assert "does not exist" in one_line_error(capsys, tmp_path, f"data.train_files={tmp_path}/nope.txt")


def test_empty_file(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in one_line_error(capsys, tmp_path, f"data.train_files={tmp_path}/empty.txt")


def test_glob_matching_nothing(capsys, tmp_path):
    line = one_line_error(capsys, tmp_path, f"data.train_files={tmp_path}/*.txt")
    assert "no files match" in line


def test_missing_text_column(capsys, tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "hello world"}\n' * 50)
    line = one_line_error(capsys, tmp_path, f"data.train_files={tmp_path}/d.jsonl")
    assert "text column 'text' not found" in line and "body" in line and "data.text_column" in line


def test_block_size_larger_than_positions(capsys, tmp_path):
    assert "max_positions" in one_line_error(capsys, tmp_path, "data.block_size=128")


def test_tokenizer_vocab_mismatch(capsys, tmp_path):
    line = one_line_error(capsys, tmp_path, "model.vocab_size=1000")
    assert "does not match the tokenizer" in line and "vocab_size=0" in line


def test_unknown_key_and_wrong_type(capsys, tmp_path):
    assert "did you mean" in one_line_error(capsys, tmp_path, "train.max_step=3")
    assert "expects an integer" in one_line_error(capsys, tmp_path, "train.max_steps=lots")


def test_missing_tokenizer_folder(capsys, tmp_path):
    assert str(tmp_path / "tok") in one_line_error(capsys, tmp_path, f"data.tokenizer={tmp_path}/tok")


def test_non_utf8_is_replaced_counted_and_reported(capsys, tmp_path):
    good = ("In the beginning was the word and the word was with the people of the land. " * 6 + "\n") * 30
    (tmp_path / "bad.txt").write_bytes(good.encode() + b"broken \xff\xfe bytes here\n" + good.encode())
    code, err = pretrain(capsys, tmp_path, f"data.train_files={tmp_path}/bad.txt")
    assert code == 0
    assert any("2 undecodable byte sequences" in line for line in err), err


def test_output_dir_of_another_run_is_refused_then_overwritten(capsys, tmp_path):
    assert pretrain(capsys, tmp_path)[0] == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    line = one_line_error(capsys, tmp_path, "model.dim=32")
    assert "holds a different run" in line and "train.overwrite=true" in line
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before  # nothing lost
    assert pretrain(capsys, tmp_path, "model.dim=32", "train.overwrite=true")[0] == 0


def test_rerun_of_a_finished_run_says_so(capsys, tmp_path):
    assert pretrain(capsys, tmp_path)[0] == 0
    code, err = pretrain(capsys, tmp_path)
    assert code == 0 and any("already trained to step 3" in line for line in err)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(capsys, tmp_path):
    assert pretrain(capsys, tmp_path, "train.save_every=1")[0] == 0
    # resumed with an absurd learning rate: the recipe's value applies on resume, and diverges
    line = one_line_error(capsys, tmp_path, "train.max_steps=20", "optim.lr=1e30", "train.save_every=1",
                          "optim.warmup_steps=1", "train.grad_clip=0")
    assert "at step" in line and "Last good checkpoint" in line and "step_" in line
    from lmssl.runs.checkpoint import find_resumable

    assert find_resumable(tmp_path / "run") is not None


def test_corrupt_latest_checkpoint_is_reported_and_skipped(capsys, tmp_path):
    assert pretrain(capsys, tmp_path, "train.save_every=1")[0] == 0
    (tmp_path / "run" / "checkpoints" / "step_0000003" / "optimizer.pt").write_bytes(b"garbage")
    code, err = pretrain(capsys, tmp_path, "train.save_every=1", "train.max_steps=4")
    assert code == 0
    assert any("step_0000003" in line and "falling back" in line for line in err), err
    assert any("resuming from" in line and "step_0000002" in line for line in err), err


@pytest.mark.parametrize("argv, word", [(["pretrain", "nosuch.yaml"], "not found"),
                                        (["generate", "/nonexistent/run"], "not an lmssl run directory"),
                                        (["tokenizer", "train", "--files", "/nonexistent/*.txt", "--out", "/tmp/x"],
                                         "no files match")])
def test_other_commands(capsys, argv, word):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err
