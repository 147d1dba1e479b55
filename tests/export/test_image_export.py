"""Image backbones out of lmssl: a ResNet run exports its torchvision-named weights (any stem)
and, with the ImageNet stem, a ResNetModel folder that stock transformers loads with the same
pooled features; a ViT run of a joint-embedding method exports ViTModel."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lmssl.config import load_config
from lmssl.export.core import export_run
from lmssl.objectives import build
from tests.export._runs import perturb, write_run

IMAGES = ["vision.image_size=32", "vision.patch_size=4", "vision.channels=3", "monitor.online_probe=false",
          "simclr.proj_hidden=32", "simclr.proj_dim=16"]


def resnet_run(tmp_path, preset: str):
    cfg = load_config(None, ["objective=simclr", f"model.preset={preset}", *IMAGES])
    torch.manual_seed(0)
    objective = build(cfg, None)
    with torch.no_grad():  # batch-norm statistics away from their 0/1 start, so eval mode matters
        for m in objective.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return cfg, write_run(tmp_path / "run", cfg, perturb(objective, scale=0.01)), objective


@pytest.mark.parametrize("preset", ["resnet18_cifar", "resnet18"])
def test_resnet_run_exports_torchvision_weights(tmp_path, preset):
    cfg, run, objective = resnet_run(tmp_path, preset)
    result = export_run(run, tmp_path / "out", log=lambda m: None)
    out = tmp_path / "out"
    assert max(result.checks.values()) < 1e-4
    weights = load_file(str(out / "torchvision_resnet18.safetensors"))
    assert "layer4.1.bn2.running_var" in weights and "fc.weight" not in weights
    readme = (out / "README.md").read_text()
    assert "torchvision.models.resnet18" in readme
    if preset == "resnet18":
        from transformers import AutoModel

        hf = AutoModel.from_pretrained(str(out)).eval()
        images = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(hf(pixel_values=images).pooler_output.flatten(1),
                                       objective.backbone.eval()(images), rtol=1e-4, atol=1e-4)
        assert "ResNetModel" in result.architecture
    else:
        assert not (out / "config.json").exists()  # no transformers class for the CIFAR stem
        assert "maxpool = torch.nn.Identity()" in readme


@pytest.mark.parametrize("init", [[], ["vision.position_scale=0.04", "vision.cls_init_std=1e-6",
                                       "model.scale_residual_init=false"]], ids=["default", "dino_init"])
def test_vit_run_of_a_joint_embedding_method_exports_vitmodel(tmp_path, init):
    """Also with dino_tiny's initialisation: the scaled sin-cos table is what the export writes."""
    from transformers import AutoModel

    cfg = load_config(None, ["objective=byol", "model.preset=vit_tiny", "model.dim=64", "model.n_layers=2",
                             "model.n_heads=4", "byol.proj_hidden=32", "byol.proj_dim=16", *IMAGES, *init])
    torch.manual_seed(0)
    objective = perturb(build(cfg, None))
    run = write_run(tmp_path / "run", cfg, objective)
    result = export_run(run, tmp_path / "out", log=lambda m: None)
    assert result.architecture == "ViTModel" and max(result.checks.values()) < 1e-4
    hf = AutoModel.from_pretrained(str(tmp_path / "out")).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=images).last_hidden_state[:, 0], objective.embed(images),
                                   rtol=1e-4, atol=1e-4)  # the class token is what lmssl's features read
