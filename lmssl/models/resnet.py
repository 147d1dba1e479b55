"""ResNet-18/34/50 convolutional backbones, ``images (B, C, H, W) -> features (B, D)``, with
torchvision's parameter names and a stock ``transformers`` twin.

The contrastive and self-distillation objectives (SimCLR, BYOL, VICReg) are usually reported on
a ResNet, so lmssl ships one beside its ViT. The module tree spells every parameter and buffer
exactly as ``torchvision.models.resnet18/34/50`` do (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer2.0.downsample.0``, ...), so a checkpoint needs no renaming on the way out; torchvision is
never imported. The classifier ``fc`` is not part of the backbone: ``forward`` returns the
globally average-pooled features (``D = 512`` for ResNet-18/34, ``2048`` for ResNet-50) that the
projector heads and the linear probe read.

Two stems:

- ``stem="imagenet"``: torchvision's 7x7 stride-2 convolution (padding 3), BN, ReLU and a 3x3
  stride-2 max-pool (padding 1); the feature map is 1/32 of the image side.
- ``stem="cifar"``: a 3x3 stride-1 convolution (padding 1), BN, ReLU and no max-pool, the usual
  choice for 32 px images (solo-learn's and lightly's CIFAR tables); the map is 1/8 of the side.
  ``conv1.weight`` is then ``(64, C, 3, 3)``. A torchvision user replaces the stem before loading::

      m = torchvision.models.resnet18(num_classes=N)
      m.conv1 = nn.Conv2d(C, 64, kernel_size=3, stride=1, padding=1, bias=False)
      m.maxpool = nn.Identity()
      m.load_state_dict(torchvision_state_dict(model, num_classes=N))

  (With ``in_channels=1`` and the ImageNet stem, the replacement is
  ``m.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)``; torchvision's
  constructors always build a 3-channel ``conv1``.)

Exports: :func:`torchvision_state_dict` (any stem) and :func:`to_hf_resnet`, a
``(ResNetConfig, state_dict)`` pair for ``transformers.ResNetModel`` (ImageNet stem only: HF's
embedder is always the 7x7 convolution + max-pool, so the CIFAR stem has no exact ``ResNetModel``
twin and its export is the torchvision state dict).

Batch norm under several processes: each DDP process normalises with its own batch's statistics
unless the BN layers are synchronised. Contrastive methods (SimCLR, BYOL) use synchronised BN;
convert the model before wrapping it (``accelerator.prepare`` / DDP)::

    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

The conversion keeps every parameter and buffer name, so both exports work on the converted
model. (``SyncBatchNorm`` needs an initialised process group to run in training mode.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import ResNetConfig

# depth -> (block, blocks per stage); the stage widths are 64, 128, 256, 512 (x4 for bottlenecks)
LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
WIDTHS = (64, 128, 256, 512)
STEMS = ("imagenet", "cifar")


def conv_bn_pair(c_in: int, c_out: int, kernel: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free ``kernel x kernel`` convolution (padding ``kernel // 2``) and its batch norm."""
    return (nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out))


def shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    """torchvision's ``downsample``: a 1x1 strided convolution + BN when the shape changes, else ``None``."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(*conv_bn_pair(c_in, c_out, 1, stride))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and an identity (or projected) shortcut:
    ``(B, c_in, H, W) -> (B, width, H / stride, W / stride)``."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn_pair(c_in, width, 3, stride)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = conv_bn_pair(width, width, 3, 1)
        self.downsample = shortcut(c_in, width, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided: "ResNet v1.5", as torchvision and HF place it), 1x1 expand:
    ``(B, c_in, H, W) -> (B, 4 * width, H / stride, W / stride)``."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn_pair(c_in, width, 1, 1)
        self.conv2, self.bn2 = conv_bn_pair(width, width, 3, stride)
        self.conv3, self.bn3 = conv_bn_pair(width, width * self.expansion, 1, 1)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(c_in, width * self.expansion, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """``images (B, C, H, W) -> features (B, num_features)``: a torchvision-named ResNet without ``fc``.

    Args:
        depth: 18, 34 or 50.
        stem: ``"imagenet"`` (7x7/2 convolution + 3x3/2 max-pool) or ``"cifar"`` (3x3/1, no pool).
        in_channels: image channels ``C`` (1 for greyscale, 3 for RGB).
        zero_init_residual: start the last BN scale (gamma) of every residual block at 0, so each
            block begins as the identity (Goyal et al. 2017; torchvision's option of that name).

    Initialisation follows torchvision: Kaiming-normal (fan-out, ReLU) convolutions, BN scale 1
    and shift 0.
    """

    def __init__(self, depth: int = 18, stem: Literal["imagenet", "cifar"] = "imagenet", in_channels: int = 3,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        if depth not in LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(LAYOUTS)} (got {depth})")
        if stem not in STEMS:
            raise ValueError(f"ResNet stem must be one of {STEMS} (got '{stem}')")
        if in_channels < 1:
            raise ValueError(f"in_channels must be a positive channel count (got {in_channels})")
        kind, blocks = LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.stem, self.in_channels = depth, stem, in_channels
        if stem == "imagenet":
            self.conv1, self.bn1 = conv_bn_pair(in_channels, 64, 7, 2)  # padding 3
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1, self.bn1 = conv_bn_pair(in_channels, 64, 3, 1)
            self.maxpool = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        c_in = 64
        for i, (width, n) in enumerate(zip(WIDTHS, blocks)):
            stage = []
            for j in range(n):
                stage.append(block(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_features = c_in
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.reset_parameters(zero_init_residual)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    nn.init.zeros_(m.last_bn.weight)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The last feature map before pooling: ``(B, C, H, W) -> (B, num_features, h, w)``
        (``h = ceil(H / 32)`` with the ImageNet stem, ``ceil(H / 8)`` with the CIFAR stem)."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"the ResNet expects images of shape (B, {self.in_channels}, H, W) "
                             f"(got {tuple(images.shape)}); set in_channels to the image channels")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))  # (B, 64, H/4 or H, W/4 or W)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return x  # (B, num_features, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, num_features)``: global average pool of :meth:`forward_features`."""
        return self.avgpool(self.forward_features(images)).flatten(1)

    def pooled(self, images: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """The image backbone interface (as :meth:`lmssl.models.VisionBackbone.pooled`): a
        ResNet always pools by averaging, whatever ``pool`` says."""
        return self(images)

    @property
    def dim(self) -> int:
        return self.num_features


def torchvision_state_dict(model: ResNet, num_classes: int = 0) -> dict[str, torch.Tensor]:
    """The weights in torchvision's naming (copies, detached).

    ``num_classes=0`` (the default) leaves ``fc`` out, as self-supervised checkpoints do; the
    torchvision user drops the classifier and loads strictly::

        m = torchvision.models.resnet18()
        m.fc = nn.Identity()
        m.load_state_dict(sd)             # strict; forward now gives the (B, 512) features

    ``num_classes=N > 0`` adds a zero ``fc.weight (N, num_features)`` and ``fc.bias (N,)``, so the
    dict loads strictly into ``torchvision.models.resnet18(num_classes=N)`` and the classifier
    starts at zero logits (a linear probe's usual start). A CIFAR-stem or 1-channel model also
    needs the ``conv1``/``maxpool`` replacement described in this module's docstring.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be 0 (no fc) or a positive class count (got {num_classes})")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if num_classes:
        ref = model.conv1.weight
        sd["fc.weight"] = torch.zeros(num_classes, model.num_features, dtype=ref.dtype, device=ref.device)
        sd["fc.bias"] = torch.zeros(num_classes, dtype=ref.dtype, device=ref.device)
    return sd


def hf_name(name: str) -> str:
    """torchvision key -> ``transformers.ResNetModel`` key, e.g.
    ``layer2.0.downsample.1.running_mean -> encoder.stages.1.layers.0.shortcut.normalization.running_mean``."""
    parts = name.split(".")
    if parts[0] in ("conv1", "bn1"):  # the stem
        return ".".join(["embedder.embedder", "convolution" if parts[0] == "conv1" else "normalization", *parts[1:]])
    stage, block, module = int(parts[0].removeprefix("layer")) - 1, parts[1], parts[2]
    prefix = f"encoder.stages.{stage}.layers.{block}"
    if module == "downsample":  # downsample.0 is the 1x1 convolution, downsample.1 its BN
        return ".".join([prefix, "shortcut", "convolution" if parts[3] == "0" else "normalization", *parts[4:]])
    index = int(module[-1]) - 1  # conv1/bn1 -> layer.0, conv2/bn2 -> layer.1, conv3/bn3 -> layer.2
    return ".".join([prefix, "layer", str(index), "convolution" if module.startswith("conv") else "normalization",
                     *parts[3:]])


def to_hf_resnet(model: ResNet) -> tuple[ResNetConfig, dict[str, torch.Tensor]]:
    """``(transformers.ResNetConfig, state_dict)`` for an exact ``transformers.ResNetModel`` twin.

    ``ResNetModel(config).load_state_dict(sd)`` loads strictly; in eval mode its
    ``pooler_output.flatten(1)`` equals ``model(images)`` and its ``last_hidden_state`` equals
    ``model.forward_features(images)``. ``downsample_in_first_stage=False`` (stage 1 keeps the
    stem's resolution, as torchvision's ``layer1`` does) and ``downsample_in_bottleneck=False``
    (the stride sits in the 3x3 convolution, ResNet v1.5, as in torchvision). Save it with
    ``m.save_pretrained(folder)``; ``AutoModel`` then loads it with no remote code.

    Only the ImageNet stem has a twin: HF's embedder is always 7x7/2 + max-pool, so a CIFAR-stem
    model raises; export it with :func:`torchvision_state_dict`.
    """
    from transformers import ResNetConfig

    if model.stem != "imagenet":
        raise ValueError("transformers.ResNetModel has only the ImageNet stem (7x7 convolution + max-pool), so a "
                         "stem='cifar' ResNet has no exact twin; export it with torchvision_state_dict(model)")
    kind, blocks = LAYOUTS[model.depth]
    expansion = 1 if kind == "basic" else Bottleneck.expansion
    config = ResNetConfig(num_channels=model.in_channels, embedding_size=64,
                          hidden_sizes=[w * expansion for w in WIDTHS], depths=list(blocks), layer_type=kind,
                          hidden_act="relu", downsample_in_first_stage=False, downsample_in_bottleneck=False)
    sd = {hf_name(k): v for k, v in torchvision_state_dict(model).items()}
    return config, sd
