"""CLIP: the loss against a direct formulation, 2 processes against 1, the logit-scale clamp,
end-of-text pooling with padding on either side, the paired data, the bundled emoji set and its
held-out split, the zero-shot command, and the export to CLIPModel + CLIPProcessor."""

from __future__ import annotations

import io
import json
import math
import re
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmssl import objectives
from lmssl.config import load_config
from lmssl.data.tokenizer import load_tokenizer
from lmssl.objectives.clip import clip_loss, end_of_text_index, recall_at
from tests.conftest import ROOT

SMALL = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "clip.text.dim=32", "clip.text.n_layers=1",
         "clip.text.n_heads=2", "clip.embed_dim=16", "vision.image_size=16", "data.block_size=16",
         "clip.text.max_positions=16", "train.micro_batch_size=8", "train.progress=false", "train.log_every=1",
         "data.eval_blocks=16", "monitor.query_images=64"]


def small_cfg(*extra: str):
    return load_config(ROOT / "recipes" / "clip_tiny.yaml", SMALL + list(extra))


def small_clip(*extra: str):
    """A one-block CLIP on 16-pixel images, the same weights at every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return objectives.build(small_cfg("clip.views=none", *extra), load_tokenizer("default"))


def fixed_batch(n: int = 8, T: int = 10) -> dict[str, torch.Tensor]:
    """Random pixels and captions of different lengths, each ending with the end-of-text id 0, right-padded (1)."""
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    ids = torch.randint(10, 500, (n, T), generator=g)
    mask = torch.zeros(n, T, dtype=torch.long)
    for i in range(n):
        length = 3 + i % (T - 3)
        ids[i, length - 1], ids[i, length:], mask[i, :length] = 0, 1, 1
    return {"images": images, "input_ids": ids, "attention_mask": mask, "index": torch.arange(n)}


# ----------------------------------------------------------------------------- loss


def test_loss_matches_direct_formulation():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=1)
    scale = 14.0
    logits = scale * img @ txt.T  # (images, captions): the paper's pseudo-code
    direct = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    loss, i2t, t2i = clip_loss(img, txt, 1 / scale)
    torch.testing.assert_close(loss, direct)
    assert float(i2t) == pytest.approx(float((logits.argmax(1) == torch.arange(6)).double().mean()))
    assert float(t2i) == pytest.approx(float((logits.argmax(0) == torch.arange(6)).double().mean()))

    model = small_clip()
    batch = fixed_batch()
    loss, metrics = model(batch)
    with torch.no_grad():
        a = F.normalize(model.image_projection(model.encode_image(model.plain_images(batch))), dim=1)
        b = F.normalize(model.text_projection(model.encode_text(batch["input_ids"], batch["attention_mask"])), dim=1)
        logits = model.logit_scale() * a @ b.T
        direct = (F.cross_entropy(logits, torch.arange(8)) + F.cross_entropy(logits.T, torch.arange(8))) / 2
    torch.testing.assert_close(loss.detach(), direct)
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)  # CLIP's initial scale


def test_logit_scale_is_clamped_at_100():
    model = small_clip()
    batch = fixed_batch()
    with torch.no_grad():
        model.temperature.logit_scale.fill_(10.0)  # exp(10) > 100
    assert float(model.logit_scale().detach()) == pytest.approx(100.0)
    loss, _ = model(batch)
    loss.backward()
    assert model.temperature.logit_scale.grad == 0  # at the bound: no gradient pushes it further
    with torch.no_grad():
        model.temperature.logit_scale.fill_(math.log(20.0))
    model.zero_grad()
    model(batch)[0].backward()
    assert float(model.logit_scale().detach()) == pytest.approx(20.0) and model.temperature.logit_scale.grad != 0


def test_two_processes_give_the_loss_and_gradients_of_one(tmp_path):
    from tests.losses._dist_util import run_workers

    batch = fixed_batch()
    torch.save(batch, tmp_path / "inputs.pt")
    outs = run_workers(Path(__file__).with_name("_clip_dist_worker.py"), tmp_path, 2)
    model = small_clip().train()
    loss, _ = model(batch)
    loss.backward()
    torch.testing.assert_close(torch.stack([o["loss"] for o in outs]).mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        for o in outs:  # DDP averaged the ranks' gradients: equal to one process on the whole batch
            torch.testing.assert_close(o["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # without the gather each process would only see its own 4 captions: a different loss
    local = model(dict(batch))[0]
    assert outs[0]["loss"] != pytest.approx(float(local.detach()))


# ----------------------------------------------------------------------------- text pooling


def test_end_of_text_index_with_padding_on_either_side():
    E, P = 0, 1  # end of text, padding
    ids = torch.tensor([[5, 6, E, P, P],  # right padding
                        [P, P, 5, 6, E],  # left padding
                        [E, E, 5, 6, E],  # left padding with the end-of-text id as the pad id
                        [5, 6, 7, P, P],  # no end of text (a caption cut short): its last real token
                        [5, E, 7, 8, E]])  # the first end of text among the real tokens
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert end_of_text_index(ids, mask, E).tolist() == [2, 4, 4, 2, 1]
    assert end_of_text_index(ids[:1, :3], None, E).tolist() == [2]

    model = small_clip()
    row = torch.tensor([[5, 6, 7, E]])
    with torch.no_grad():
        alone = model.encode_text(row, torch.ones_like(row))
        right = model.encode_text(torch.tensor([[5, 6, 7, E, P, P]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
        left_ids, left_mask = torch.tensor([[P, P, 5, 6, 7, E]]), torch.tensor([[0, 0, 1, 1, 1, 1]])
        left = model.encode_text(left_ids, left_mask)
        h = model.text(left_ids, left_mask, is_causal=True)
    torch.testing.assert_close(right, alone)  # causal: padding after the end changes nothing
    torch.testing.assert_close(left, h[:, 5])  # the end-of-text position, not the last padding


def test_recall_at():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.0, 0.5, 0.4]])
    assert recall_at(sim, (1, 2)) == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0)}  # rows 1, 2: second


# ----------------------------------------------------------------------------- data


def test_bundled_pairs_hold_out_names_never_trained_on():
    from lmssl.data.emoji import GROUPS, bundled_pair_files, load_bundled

    train, test = load_bundled("train"), load_bundled("validation")
    assert len(train) > 3000 and 200 < len(test) < 400
    assert sum(p.stat().st_size for p in bundled_pair_files().values()) < 5_000_000
    assert test.features["label"].names == list(test["name"]) and list(test["label"]) == list(range(len(test)))
    assert test.features["group"].names == GROUPS
    image = test[0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    held = list(test["name"])
    assert not set(held) & set(train["name"])
    names = re.compile("|".join(rf"(?<![\w-]){re.escape(n.lower())}(?![\w-])" for n in held))  # as whole words
    texts = [" | ".join([n, *k]).lower() for n, k in zip(train["name"], train["keywords"])]
    leaks = [m.group(0) for t in texts if (m := names.search(t)) is not None]
    assert not leaks, f"held-out names in training captions: {leaks[:3]}"
    assert all(c[0] == cap and c[1] == n for c, cap, n in zip(train["captions"], train["caption"], train["name"]))


def test_pair_batches_are_keyed_by_position():
    from lmssl.data import build_data

    cfg = small_cfg()
    tok = load_tokenizer("default")
    data = build_data(cfg, objectives.get("clip"), tok, log=lambda m: None)
    batch, first = next(data.stream(cfg, 0, 0, 1))
    assert first == 0 and batch["images"].dtype == torch.uint8 and batch["images"].shape == (8, 3, 16, 16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[1] <= cfg.data.block_size and "views" in batch
    assert ((ids == tok.eos_token_id) & mask.bool()).sum(dim=1).tolist() == [1] * 8  # one end of text per caption
    last = mask.sum(dim=1) - 1
    assert (ids[torch.arange(8), last] == tok.eos_token_id).all()
    # the same positions give the same pairs, views and captions, however the batch is cut
    again = data.train.batch(list(range(4, 8)))
    assert torch.equal(again["images"], batch["images"][4:])
    assert torch.equal(again["views"]["views"][0]["box"], batch["views"]["views"][0]["box"][4:])
    T = again["input_ids"].shape[1]
    assert torch.equal(again["input_ids"], batch["input_ids"][4:, :T])
    held = data.held_out
    assert len(held.images) == 64 and len(held.classes) == 255 and (held.labels >= 0).all()


def test_local_jsonl_pairs_with_relative_image_paths(tmp_path):
    from PIL import Image

    from lmssl.data.pairs import load_pairs

    rows = []
    for i in range(10):
        Image.new("RGB", (20, 24), (25 * i, 0, 255 - 25 * i)).save(tmp_path / f"im{i}.png")
        rows.append({"file": f"im{i}.png", "text": [f"colour {i}", f"shade {i}"] if i % 2 else f"colour {i}"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = small_cfg(f"data.train_files=[{tmp_path / 'pairs.jsonl'}]", "vision.image_column=file",
                    "data.text_column=text",
                    "data.validation_fraction=0.2")
    train, val = load_pairs(cfg, "train"), load_pairs(cfg, "validation")
    assert len(train) == 8 and len(val) == 2
    from lmssl.data.pairs import PairSource

    source = PairSource(train, cfg, load_tokenizer("default"), shuffle=True)
    batch = source.batch([0, 1, 2])
    assert batch["images"].shape == (3, 3, 16, 16) and batch["labels"].tolist() == [-1, -1, -1]

    # streamed (types unknown until read): a fresh stream skipped to a position gives the same pairs
    from lmssl.data.pairs import StreamingPairs, build_pair_data

    cfg = small_cfg(f"data.train_files=[{tmp_path / 'pairs.jsonl'}]", "vision.image_column=file",
                    "data.text_column=text", "data.streaming=true", "data.validation_fraction=0.2",
                    "data.shuffle_buffer=4", "data.eval_blocks=2", "monitor.query_images=2")
    data = build_pair_data(cfg, load_tokenizer("default"), log=lambda m: None)
    data.train.batch([0, 1, 2, 3])
    later = data.train.batch([4, 5, 6, 7])
    fresh = StreamingPairs(cfg, load_tokenizer("default")).batch([4, 5, 6, 7])
    assert torch.equal(later["images"], fresh["images"]) and torch.equal(later["input_ids"], fresh["input_ids"])
    assert data.held_out.captions == ["colour 0", "colour 5"]


# ----------------------------------------------------------------------------- a short run: zero-shot, export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from lmssl.train.loop import train

    out = tmp_path_factory.mktemp("clip_run")
    train(small_cfg(f"train.output_dir={out}", "train.max_steps=3", "train.eval_every=0", "train.save_every=0"))
    return out


def test_zero_shot_command(run_dir, tmp_path, capsys):
    from PIL import Image

    from lmssl.data.emoji import load_bundled
    from lmssl.zero_shot import run

    assert (run_dir / "zero_shot.png").is_file()  # the end-of-run picture
    args = Namespace(run_dir=str(run_dir), images=[], labels="", template=None, top=3, limit=4,
                     picture=str(tmp_path / "zs.png"))
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "zero-shot accuracy on 255 held-out images among 255 classes" in out and "(chance 0.39%)" in out
    assert (tmp_path / "zs.png").is_file()
    load_bundled("validation")[0]["image"].save(tmp_path / "face.png")
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    args = Namespace(run_dir=str(run_dir), images=[str(tmp_path / "face.png"), str(tmp_path / "red.png")],
                     labels="red heart, grinning face,cat", template="a photo of a {}", top=2, limit=4, picture=None)
    assert run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(tmp_path / "face.png")) and lines[0].count("%") == 2


def test_export_to_clip_model_and_processor(run_dir, tmp_path):
    import transformers
    from safetensors.torch import load_file, save_file

    from lmssl.data.emoji import load_bundled
    from lmssl.data.images import decode_image
    from lmssl.export.core import MAX_DIFF, export_run
    from lmssl.export.transformers_map import check_clip
    from lmssl.runs import load_run

    result = export_run(run_dir, tmp_path / "export", log=lambda m: None)
    assert result.architecture == "CLIPModel" and len(result.checks) == 6
    assert max(result.checks.values()) <= MAX_DIFF
    card = (tmp_path / "export" / "README.md").read_text()
    assert "## Zero-shot classification and retrieval" in card and "among 255 classes" in card

    # stock transformers, end to end: a PIL image and prompts through CLIPProcessor and CLIPModel
    model = transformers.CLIPModel.from_pretrained(str(tmp_path / "export")).eval()
    processor = transformers.CLIPProcessor.from_pretrained(str(tmp_path / "export"))
    images = [load_bundled("validation")[i]["image"] for i in (0, 5)]  # 32 px: resized to the run's 16
    labels = ["red heart", "grinning face", "an emoji of a cat face"]
    with torch.no_grad():
        theirs = model(**processor(text=labels, images=images, return_tensors="pt", padding=True)).logits_per_image
    objective, cfg, _ = load_run(run_dir)
    pixels = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        pixels.append(torch.from_numpy(decode_image({"bytes": buf.getvalue()}, 3, cfg.vision.image_size)))
    with torch.no_grad():
        ours = objective.logit_scale() * objective.embed_images(torch.stack(pixels)) @ objective.embed_texts(labels).T
    assert float((ours - theirs).abs().max()) <= 1e-4

    # the check is not blind: a slightly changed weight in the folder fails it
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for name in ("text_model.final_layer_norm.weight", "vision_model.pre_layrnorm.bias"):  # (a uniform shift or
        weights[name] = weights[name] + 0.01 * torch.randn(weights[name].shape, generator=g)  # scale: LN ignores it)
    save_file(weights, str(tmp_path / "export" / "model.safetensors"), metadata={"format": "pt"})
    checks = check_clip(objective, cfg, tmp_path / "export")
    assert checks["text embeds (get_text_features)"] > MAX_DIFF
    assert checks["image embeds (get_image_features)"] > MAX_DIFF


def test_a_tower_clip_cannot_express_is_refused():
    from lmssl.export.transformers_map import FamilyMismatch, clip_config_problems, find_converter

    cfg = small_cfg("model.embedding_norm=false", "clip.text.preset=llama_tiny", "clip.text.dim=32",
                    "clip.text.n_heads=2", "clip.text.n_kv_heads=0", "clip.text.max_positions=16")
    problems = clip_config_problems(cfg)
    assert any("model.embedding_norm=False" in p and "pre_layrnorm" in p for p in problems)
    assert any(p.startswith("clip.text.norm='rmsnorm'") for p in problems)
    with pytest.raises(FamilyMismatch):
        find_converter(cfg)
    assert clip_config_problems(small_cfg()) == []
