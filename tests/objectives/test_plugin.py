"""A new method is one file: an objective defined here, outside lmssl, registers itself and
then trains through `lmssl pretrain`'s loop with its own YAML section, resumes, is probed and
exported, with no edit anywhere else (the registry is restored afterwards)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lmssl import objectives, registry
from lmssl.config import load_config
from lmssl.errors import UserError
from lmssl.models import LMHead, TextBackbone
from lmssl.models.flops import transformer_flops_per_token
from lmssl.objectives import Objective, mean_pool, register
from lmssl.train.loop import train
from tests.conftest import TINY


@dataclass
class DenoiseConfig:
    replace_rate: float = 0.2  # tokens replaced by random ones; the model restores every position


class Denoise(Objective):
    """Toy denoising autoencoder over tokens: a bidirectional backbone restores the original
    token at every position of a corrupted sequence."""

    name = "toy_denoise"
    modality = "text"
    Config = DenoiseConfig
    description = "toy token denoising"
    recipe = "gpt_tiny"

    def __init__(self, cfg) -> None:
        super().__init__()
        self.cfg, self.rate, self.block = cfg.model, cfg.toy_denoise.replace_rate, cfg.data.block_size
        self.backbone = TextBackbone(cfg.model)
        self.head = LMHead(cfg.model, self.backbone.tokens)

    @classmethod
    def build(cls, cfg, tokenizer):
        return cls(cfg)

    @classmethod
    def validate_config(cls, cfg) -> None:
        if not 0 <= cfg.toy_denoise.replace_rate < 1:
            raise UserError(f"toy_denoise.replace_rate must be in [0, 1), got {cfg.toy_denoise.replace_rate}")

    def prepare_batch(self, batch, generator):
        ids = batch["input_ids"]
        noise = torch.randint(0, self.cfg.vocab_size, ids.shape, generator=generator)
        replace = torch.rand(ids.shape, generator=generator) < self.rate
        return {**batch, "input_ids": torch.where(replace, noise, ids), "labels": ids}

    def forward(self, batch):
        h = self.backbone(batch["input_ids"], is_causal=False)
        logits = self.head(h)[..., : self.cfg.vocab_size]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        return loss, {"loss": loss.detach()}

    def features(self, batch):
        mask = batch.get("attention_mask")
        return mean_pool(self.backbone(batch["input_ids"], mask, is_causal=False), mask)

    def flops_per_sample(self) -> float:
        return self.block * transformer_flops_per_token(self.cfg, self.backbone.num_params(), self.block)


@pytest.fixture
def toy():
    register(Denoise)
    try:
        yield Denoise
    finally:
        registry.OBJECTIVES.pop("toy_denoise", None)


def test_a_new_objective_trains_resumes_probes_and_exports_from_one_file(toy, tmp_path):
    from lmssl.export.core import export_run
    from lmssl.probe import probe_run

    recipe = tmp_path / "toy.yaml"
    recipe.write_text("objective: toy_denoise\nmodel:\n  preset: bert_tiny\ntoy_denoise:\n  replace_rate: 0.3\n")
    out = tmp_path / "run"
    args = TINY + ["model.preset=bert_tiny", f"train.output_dir={out}", "train.max_steps=12", "train.save_every=6",
                   "train.eval_every=6"]
    cfg = load_config(recipe, args)
    assert cfg.toy_denoise.replace_rate == 0.3 and "toy_denoise" in cfg.to_dict()
    result = train(cfg)
    rows = [r["loss"] for r in __import__("lmssl.train.log", fromlist=["read_log"]).read_log(out / "log.jsonl")
            if "loss" in r and r.get("kind") != "eval"]
    assert result["step"] == 12 and rows[-1] < rows[0]
    assert train(load_config(recipe, args + ["train.max_steps=14"]))["step"] == 14  # resumes at step 12
    assert probe_run(str(out), seeds=[0], log=lambda m: None)["run_mean"] > 1 / 6
    exported = export_run(out, tmp_path / "export", log=lambda m: None)  # bert family: BertModel backbone
    assert exported.kind in ("backbone", "native")
    with pytest.raises(UserError, match="replace_rate"):
        load_config(recipe, ["toy_denoise.replace_rate=1.5"])
    assert "toy_denoise" in objectives.names()
