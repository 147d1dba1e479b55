"""Every registered objective, through the real trainer: the contract of lmssl.objectives.

For each name in the registry (a new objective joins by registering; nothing here lists
them), its shipped recipe shrunk by its own ``smoke_overrides`` trains for 4 steps, then:
the loss on the batches it trained on fell below that of the same network at initialisation
(after a handful of steps a held-out loss may not have moved yet: CPC starts at exactly
log(candidates)); a run resumed
from the step-2 checkpoint ends with bit-identical weights; ``features`` gives ``(B, D)``;
``lmssl probe`` runs on it; the export, where the objective has one, reloads in stock
``transformers`` and matches (the exporter checks that itself and raises otherwise).
The host-read check of every objective is in ``tests/train/test_host_reads.py``.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lmssl import objectives
from lmssl.config import load_config
from lmssl.data import build_data
from lmssl.data.tokenizer import load_tokenizer
from lmssl.evaluate import evaluate_objective
from lmssl.runs import load_run
from lmssl.train.loop import step_seed, train
from tests.conftest import ROOT

NAMES = objectives.names()
GENERIC = ["train.micro_batch_size=8", "train.log_every=1", "train.eval_every=0", "train.progress=false",
           "optim.warmup_steps=1", "data.eval_blocks=16", "monitor.bank_images=64", "monitor.query_images=32"]
STEPS = 4


def smoke_overrides(name: str) -> list[str]:
    """The objective's recipe shrunk to seconds: its own smoke overrides, then the generic ones."""
    cls = objectives.get(name)
    return list(cls.smoke_overrides) + GENERIC


def smoke_config(name: str, out, *extra: str):
    cls = objectives.get(name)
    assert cls.recipe, f"objective '{name}' names no shipped recipe (class attribute `recipe`)"
    return load_config(ROOT / "recipes" / f"{cls.recipe}.yaml", smoke_overrides(name) + [f"train.output_dir={out}",
                                                                                      *extra])


def trained_batches_loss(objective, cfg, tokenizer, count: int = 2) -> float:
    """The loss (eval mode) on the first ``count`` training micro-batches, prepared as in training."""
    data = build_data(cfg, objectives.get(cfg.objective), tokenizer, log=lambda m: None)
    stream = data.stream(cfg, 0, 0, 1)
    batches = []
    for _ in range(count):
        batch, first = next(stream)
        batches.append(objective.prepare_batch(batch, torch.Generator().manual_seed(step_seed(cfg.train.seed, first, 0))))
    return evaluate_objective(objective, batches, torch.device("cpu"))["loss"]


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(f"conformance_{name}")
    cfg = smoke_config(name, out, f"train.max_steps={STEPS}", "train.save_every=2")
    result = train(cfg)
    return name, out, cfg, result


def test_loss_falls_and_resume_is_exact(trained):
    name, out, cfg, result = trained
    assert result["step"] == STEPS and math.isfinite(result["eval_loss"])
    model, cfg, tokenizer = load_run(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        initial = objectives.build(cfg, tokenizer)  # the weights the run started from
    before, after = trained_batches_loss(initial, cfg, tokenizer), trained_batches_loss(model, cfg, tokenizer)
    assert after < before, f"{name}: loss {before:.4f} at initialisation, {after:.4f} after {STEPS} steps"

    final = load_file(str(out / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    resumed = out.parent / f"{out.name}_resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:07d}")  # as if killed after the step-2 save
    again = train(smoke_config(name, resumed, f"train.max_steps={STEPS}", "train.save_every=2"))
    assert again["step"] == STEPS
    replay = load_file(str(resumed / "checkpoints" / f"step_{STEPS:07d}" / "model.safetensors"))
    assert final.keys() == replay.keys()
    different = [k for k in final if not torch.equal(final[k], replay[k])]
    assert not different, f"{name}: resuming at step 2 changed {different[:3]}"


def test_features_shape(trained):
    name, out, cfg, _ = trained
    model, cfg, tokenizer = load_run(out)
    data = build_data(cfg, objectives.get(name), tokenizer, log=lambda m: None)
    batch = data.eval_batches[0]
    with torch.no_grad():
        feats = model.features(batch)
    B = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    assert feats.dim() == 2 and feats.shape[0] == B and feats.shape[1] > 0 and torch.isfinite(feats).all()
    assert model.flops_per_sample() > 0


def test_probe_runs(trained):
    from lmssl.probe import probe_run

    name, out, cfg, _ = trained
    r = probe_run(str(out), seeds=[0], log=lambda m: None, max_images=200, few_labels=2)
    assert 0.0 <= r["run_mean"] <= 1.0 and 0.0 <= r["knn_run"] <= 1.0 and r["dim"] > 0
    assert "run features" in r["table"]


def test_export_reloads_if_it_has_one(trained, tmp_path):
    from lmssl.export.core import export_run
    from lmssl.export.transformers_map import NoExactTwin, find_converter

    name, out, cfg, _ = trained
    try:
        find_converter(cfg)
    except NoExactTwin:
        pytest.skip(f"'{name}' with family '{cfg.model.family}' has no transformers twin")
    result = export_run(out, tmp_path / "export", log=lambda m: None)
    assert result.checks and max(result.checks.values()) <= 1e-4  # the export reloaded and matched
    assert (tmp_path / "export" / "README.md").is_file()


def test_every_objective_declares_the_contract():
    for name in NAMES:
        cls = objectives.get(name)
        assert cls.name == name and cls.modality in ("text", "images", "image_text") and cls.description
        if cls.Config is not None:
            assert name in load_config(None, []).sections  # its YAML section is composed into RunConfig
        assert (ROOT / "recipes" / f"{cls.recipe}.yaml").is_file()
    assert load_tokenizer("default") is not None
