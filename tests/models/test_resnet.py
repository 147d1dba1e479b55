"""The ResNet backbone: torchvision's exact state-dict layout, forward shapes for 28/32 px greyscale
and RGB images, gradients, and output parity with stock ``transformers.ResNetModel``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import ResNetModel

from lmssl.models.resnet import ResNet, to_hf_resnet, torchvision_state_dict

# ``torchvision.models.resnet18(num_classes=1000).state_dict()``: key and shape, in order (torchvision
# cannot be imported here). 6 stem entries (conv1 + 5 BN tensors), 12 per basic block x 8 blocks,
# 6 per downsample shortcut x 3 (layer2.0, layer3.0, layer4.0), 2 for fc: 6 + 96 + 18 + 2 = 122.
# "-" is the 0-dim int64 ``num_batches_tracked``.
TORCHVISION_RESNET18 = """
conv1.weight 64,3,7,7
bn1.weight 64
bn1.bias 64
bn1.running_mean 64
bn1.running_var 64
bn1.num_batches_tracked -
layer1.0.conv1.weight 64,64,3,3
layer1.0.bn1.weight 64
layer1.0.bn1.bias 64
layer1.0.bn1.running_mean 64
layer1.0.bn1.running_var 64
layer1.0.bn1.num_batches_tracked -
layer1.0.conv2.weight 64,64,3,3
layer1.0.bn2.weight 64
layer1.0.bn2.bias 64
layer1.0.bn2.running_mean 64
layer1.0.bn2.running_var 64
layer1.0.bn2.num_batches_tracked -
layer1.1.conv1.weight 64,64,3,3
layer1.1.bn1.weight 64
layer1.1.bn1.bias 64
layer1.1.bn1.running_mean 64
layer1.1.bn1.running_var 64
layer1.1.bn1.num_batches_tracked -
layer1.1.conv2.weight 64,64,3,3
layer1.1.bn2.weight 64
layer1.1.bn2.bias 64
layer1.1.bn2.running_mean 64
layer1.1.bn2.running_var 64
layer1.1.bn2.num_batches_tracked -
layer2.0.conv1.weight 128,64,3,3
layer2.0.bn1.weight 128
layer2.0.bn1.bias 128
layer2.0.bn1.running_mean 128
layer2.0.bn1.running_var 128
layer2.0.bn1.num_batches_tracked -
layer2.0.conv2.weight 128,128,3,3
layer2.0.bn2.weight 128
layer2.0.bn2.bias 128
layer2.0.bn2.running_mean 128
layer2.0.bn2.running_var 128
layer2.0.bn2.num_batches_tracked -
layer2.0.downsample.0.weight 128,64,1,1
layer2.0.downsample.1.weight 128
layer2.0.downsample.1.bias 128
layer2.0.downsample.1.running_mean 128
layer2.0.downsample.1.running_var 128
layer2.0.downsample.1.num_batches_tracked -
layer2.1.conv1.weight 128,128,3,3
layer2.1.bn1.weight 128
layer2.1.bn1.bias 128
layer2.1.bn1.running_mean 128
layer2.1.bn1.running_var 128
layer2.1.bn1.num_batches_tracked -
layer2.1.conv2.weight 128,128,3,3
layer2.1.bn2.weight 128
layer2.1.bn2.bias 128
layer2.1.bn2.running_mean 128
layer2.1.bn2.running_var 128
layer2.1.bn2.num_batches_tracked -
layer3.0.conv1.weight 256,128,3,3
layer3.0.bn1.weight 256
layer3.0.bn1.bias 256
layer3.0.bn1.running_mean 256
layer3.0.bn1.running_var 256
layer3.0.bn1.num_batches_tracked -
layer3.0.conv2.weight 256,256,3,3
layer3.0.bn2.weight 256
layer3.0.bn2.bias 256
layer3.0.bn2.running_mean 256
layer3.0.bn2.running_var 256
layer3.0.bn2.num_batches_tracked -
layer3.0.downsample.0.weight 256,128,1,1
layer3.0.downsample.1.weight 256
layer3.0.downsample.1.bias 256
layer3.0.downsample.1.running_mean 256
layer3.0.downsample.1.running_var 256
layer3.0.downsample.1.num_batches_tracked -
layer3.1.conv1.weight 256,256,3,3
layer3.1.bn1.weight 256
layer3.1.bn1.bias 256
layer3.1.bn1.running_mean 256
layer3.1.bn1.running_var 256
layer3.1.bn1.num_batches_tracked -
layer3.1.conv2.weight 256,256,3,3
layer3.1.bn2.weight 256
layer3.1.bn2.bias 256
layer3.1.bn2.running_mean 256
layer3.1.bn2.running_var 256
layer3.1.bn2.num_batches_tracked -
layer4.0.conv1.weight 512,256,3,3
layer4.0.bn1.weight 512
layer4.0.bn1.bias 512
layer4.0.bn1.running_mean 512
layer4.0.bn1.running_var 512
layer4.0.bn1.num_batches_tracked -
layer4.0.conv2.weight 512,512,3,3
layer4.0.bn2.weight 512
layer4.0.bn2.bias 512
layer4.0.bn2.running_mean 512
layer4.0.bn2.running_var 512
layer4.0.bn2.num_batches_tracked -
layer4.0.downsample.0.weight 512,256,1,1
layer4.0.downsample.1.weight 512
layer4.0.downsample.1.bias 512
layer4.0.downsample.1.running_mean 512
layer4.0.downsample.1.running_var 512
layer4.0.downsample.1.num_batches_tracked -
layer4.1.conv1.weight 512,512,3,3
layer4.1.bn1.weight 512
layer4.1.bn1.bias 512
layer4.1.bn1.running_mean 512
layer4.1.bn1.running_var 512
layer4.1.bn1.num_batches_tracked -
layer4.1.conv2.weight 512,512,3,3
layer4.1.bn2.weight 512
layer4.1.bn2.bias 512
layer4.1.bn2.running_mean 512
layer4.1.bn2.running_var 512
layer4.1.bn2.num_batches_tracked -
fc.weight 1000,512
fc.bias 1000
"""


def torchvision_listing(conv1: tuple[int, ...] = (64, 3, 7, 7), num_classes: int = 1000) -> list[tuple[str, tuple]]:
    rows = []
    for line in TORCHVISION_RESNET18.strip().splitlines():
        name, shape = line.split()
        rows.append((name, () if shape == "-" else tuple(int(s) for s in shape.split(","))))
    rows[0] = ("conv1.weight", conv1)
    return [(n, (num_classes, 512) if n == "fc.weight" else (num_classes,) if n == "fc.bias" else s)
            for n, s in rows if num_classes or not n.startswith("fc.")]


def listing_of(sd: dict[str, torch.Tensor]) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in sd.items()]


def test_the_listing_is_torchvisions_resnet18():
    rows = torchvision_listing()
    assert len(rows) == 122 and len({n for n, _ in rows}) == 122
    # torchvision's documented parameter count for resnet18 (buffers excluded)
    n_params = sum(torch.Size(s).numel() for n, s in rows if n.endswith(("weight", "bias")))
    assert n_params == 11_689_512


def test_resnet18_state_dict_is_torchvisions_key_for_key():
    model = ResNet(18)
    assert listing_of(torchvision_state_dict(model, num_classes=1000)) == torchvision_listing()
    assert listing_of(torchvision_state_dict(model, num_classes=10)) == torchvision_listing(num_classes=10)
    # without fc: what resnet18() with ``m.fc = nn.Identity()`` holds
    assert listing_of(torchvision_state_dict(model)) == torchvision_listing(num_classes=0)
    assert listing_of(model.state_dict()) == torchvision_listing(num_classes=0)
    sd = torchvision_state_dict(model, num_classes=10)
    assert sd["layer1.0.bn1.num_batches_tracked"].dtype == torch.int64
    assert not sd["fc.weight"].any() and not sd["fc.bias"].any()
    assert sd["conv1.weight"].data_ptr() != model.conv1.weight.data_ptr()  # a copy, not a view


@pytest.mark.parametrize("in_channels", [1, 3])
def test_cifar_stem_differs_from_torchvision_only_in_conv1(in_channels):
    model = ResNet(18, stem="cifar", in_channels=in_channels)
    assert listing_of(torchvision_state_dict(model, num_classes=10)) == torchvision_listing((64, in_channels, 3, 3), 10)
    assert isinstance(model.maxpool, nn.Identity)


def test_deeper_layouts_have_torchvisions_parameter_counts():
    # torchvision's resnet34 / resnet50 totals, less their fc (512 * 1000 + 1000, 2048 * 1000 + 1000)
    for depth, total, fc in [(34, 21_797_672, 513_000), (50, 25_557_032, 2_049_000)]:
        model = ResNet(depth)
        assert sum(p.numel() for p in model.parameters()) == total - fc
    assert model.num_features == 2048 and "layer1.0.downsample.0.weight" in model.state_dict()
    assert tuple(model.state_dict()["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)  # strided 3x3 (v1.5)


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_pools_to_512_features_for_small_images(stem, in_channels):
    torch.manual_seed(0)
    model = ResNet(18, stem=stem, in_channels=in_channels)
    for size in (28, 32):  # MNIST-like and CIFAR-like
        images = torch.randn(4, in_channels, size, size)
        features = model(images)
        assert features.shape == (4, 512) and torch.isfinite(features).all()
        side = -(-size // 32) if stem == "imagenet" else -(-size // 8)
        assert model.forward_features(images).shape == (4, 512, side, side)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ResNet(18, stem="cifar", in_channels=3)
    model(torch.randn(4, 3, 16, 16)).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_zero_init_residual_zeroes_each_blocks_last_bn_scale():
    model = ResNet(18, zero_init_residual=True)
    last = [m.bn2.weight for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for m in stage]
    assert len(last) == 8 and all(not w.any() for w in last)
    assert model.layer1[0].bn1.weight.eq(1).all() and model.bn1.weight.eq(1).all()
    assert all(not b.bn3.weight.any() for b in ResNet(50, zero_init_residual=True).layer3)


def test_bad_arguments_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="depth"):
        ResNet(20)
    with pytest.raises(ValueError, match="stem"):
        ResNet(18, stem="tiny")
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        ResNet(18, in_channels=1)(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        torchvision_state_dict(ResNet(18), num_classes=-1)
    with pytest.raises(ValueError, match="no exact twin"):
        to_hf_resnet(ResNet(18, stem="cifar"))


def randomise_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine terms, so that eval-mode parity tests them."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            m.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=generator))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=generator))
            m.num_batches_tracked.fill_(7)


@pytest.mark.parametrize("in_channels", [1, 3])
def test_hf_resnet_model_reproduces_the_backbone(in_channels):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResNet(18, in_channels=in_channels)
    with torch.no_grad():
        randomise_batch_norms(model, g)
    config, sd = to_hf_resnet(model)
    assert (config.layer_type, config.depths, config.hidden_sizes) == ("basic", [2, 2, 2, 2], [64, 128, 256, 512])
    assert (config.num_channels, config.embedding_size, config.downsample_in_first_stage) == (in_channels, 64, False)
    hf = ResNetModel(config)
    hf.load_state_dict(sd, strict=True)
    model.eval(), hf.eval()
    images = torch.randn(2, in_channels, 64, 64, generator=g)
    with torch.no_grad():
        ours, out = model(images), hf(images)
        torch.testing.assert_close(out.pooler_output.flatten(1), ours, rtol=0, atol=1e-5)
        torch.testing.assert_close(out.last_hidden_state, model.forward_features(images), rtol=0, atol=1e-5)
    assert int(hf.encoder.stages[0].layers[0].layer[0].normalization.num_batches_tracked) == 7


def test_resnet50_maps_key_for_key_onto_hf():
    config, sd = to_hf_resnet(ResNet(50))
    assert (config.layer_type, config.hidden_sizes, config.downsample_in_bottleneck) == (
        "bottleneck", [256, 512, 1024, 2048], False)
    with torch.device("meta"):
        hf = ResNetModel(config)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in hf.state_dict().items()}


def test_sync_batch_norm_conversion_keeps_the_exports():
    model = ResNet(18, stem="cifar")
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced.layer1[0].bn1, nn.SyncBatchNorm)
    plain = ResNet(18, stem="cifar")
    assert listing_of(torchvision_state_dict(synced, 10)) == listing_of(torchvision_state_dict(plain, 10))
