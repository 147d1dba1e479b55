"""`lmssl finetune` on image runs: the ViT backbone exported, fine-tuned as
ViTForImageClassification on the run's own labelled images (or image folders) with a few
labels per class, through the same loop (exact resume, views replayed)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from lmssl.cli import main
from lmssl.finetune import finetune, load_finetune_config
from lmssl.train.log import read_log
from lmssl.train.loop import train
from tests.objectives.test_conformance import smoke_config
from tests.test_finetune import _killed_and_restarted, _same_weights

PER_CLASS = {"train": 20, "val": 8}  # Fashion-MNIST images per class in the folders


def _image_folders(root) -> dict[str, str]:
    """``root/train`` and ``root/val``: the first bundled Fashion-MNIST images of every class as
    PNG files, one sub-folder per class (what `datasets`' imagefolder reads)."""
    from lmssl.data.fashion_mnist import load_bundled

    folders = {}
    for split, bundled in (("train", "train"), ("val", "validation")):
        ds = load_bundled(bundled)
        names = ds.features["label"].names
        counts: dict[int, int] = {}
        for row in ds.cast_column("image", type(ds.features["image"])(decode=False)):
            label = row["label"]
            if counts.get(label, 0) >= PER_CLASS[split]:
                continue
            if len(counts) == len(names) and min(counts.values()) >= PER_CLASS[split]:
                break
            counts[label] = counts.get(label, 0) + 1
            folder = root / split / names[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{counts[label]:03d}.png").write_bytes(row["image"]["bytes"])
        folders[split] = str(root / split)
    return folders


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A 2-step MAE smoke run (ViT 2 x 64 on 28 x 28 greyscale images) on the image folders."""
    root = tmp_path_factory.mktemp("ft_images")
    folders = _image_folders(root)
    out = root / "mae"
    train(smoke_config("mae", out, "train.max_steps=2", "train.save_every=2", "monitor.bank_images=0",
                       f"data.train_files=[{folders['train']}]", f"data.validation_files=[{folders['val']}]"))
    return out, folders


def test_few_labels_on_the_runs_own_images(image_run, tmp_path, capsys):
    from PIL import Image
    from transformers import AutoImageProcessor, ViTForImageClassification

    run, folders = image_run
    out = tmp_path / "ft"
    assert main(["finetune", str(run), "--labels-per-class", "10", "--max-steps", "60", "--batch-size", "25",
                 "--lr", "3e-3", "--eval-every", "30", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ViTForImageClassification" in printed and "100 train / 80 validation examples" in printed
    log = [r for r in read_log(out / "log.jsonl") if r.get("kind") != "eval"]
    assert log[-1]["loss"] < log[0]["loss"] - 0.2 and "examples_per_s" in log[0]
    best = json.loads((out / "metrics.json").read_text())["best"]
    # a ViT of 2 x 64 from 2 steps of MAE, 10 labels per class: 10 classes, chance is 10%
    assert best["accuracy"] >= 0.2 and 0 < best["macro_f1"] <= 1, best
    model = ViTForImageClassification.from_pretrained(out / "best")
    assert model.config.num_labels == 10 and "Trouser" in model.config.label2id
    image = Image.open(io.BytesIO(sorted(Path(folders["val"]).rglob("*.png"))[0].read_bytes()))  # greyscale
    inputs = AutoImageProcessor.from_pretrained(out / "best")(images=image, return_tensors="pt")
    with torch.no_grad():
        label = model.config.id2label[int(model(**inputs).logits.argmax())]
    assert label in model.config.label2id


def test_image_folders_from_scratch_resume_exactly(image_run, tmp_path):
    """--train-file/--validation-file folders, --from-scratch; killed after the step-4
    checkpoint and run again: the same step-6 weights (the augmented views replay)."""
    run, folders = image_run
    settings = dict(model=str(run), train_file=folders["train"], validation_file=folders["val"], from_scratch=True,
                    max_train_examples=64, max_steps=6, save_every=2, eval_every=3, batch_size=16, lr=1e-3,
                    progress=False)

    def again(out):
        return finetune(load_finetune_config(None, {**settings, "output_dir": str(out)}), log=lambda m: None)

    first = again(tmp_path / "ft")
    assert first["steps"] == 6 and 0 <= first["best"]["accuracy"] <= 1
    restarted = _killed_and_restarted(tmp_path / "ft", 4, again)
    _same_weights(tmp_path / "ft", restarted, 6)


def test_image_run_errors_are_one_line(image_run, tmp_path, capsys):
    run, _ = image_run
    assert main(["finetune", str(run), "--task", "token", "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an image run" in err[0]


def test_a_resnet_run_says_why_in_one_line(tmp_path, capsys):
    from lmssl.config import load_config
    from lmssl.objectives import build
    from tests.export._runs import write_run

    cfg = load_config(None, ["objective=simclr", "model.preset=resnet18_cifar", "vision.image_size=32",
                             "vision.channels=3", "monitor.online_probe=false"])
    torch.manual_seed(0)
    run = write_run(tmp_path / "resnet", cfg, build(cfg, None))
    assert main(["finetune", str(run), "--output-dir", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resnet image run" in err[0] and "ViTForImageClassification" in err[0]
    assert not (tmp_path / "ft").exists()
