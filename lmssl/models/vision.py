"""Vision wrapper around the shared core: image patches (+ fixed 2-D positions) -> hidden states.

A ViT is the same :class:`~lmssl.models.transformer.Transformer` that GPT and BERT use,
fed patch embeddings instead of token embeddings, with a class token in front.
"""

from __future__ import annotations

import torch
from torch import nn

from lmssl.config import ModelConfig, VisionConfig
from lmssl.masking import gather_tokens
from lmssl.models.transformer import Transformer, init_weights
from lmssl.nn import PatchEmbedding, make_norm, patchify, sincos_positions_2d


class VisionBackbone(nn.Module):
    """``images (B, C, H, W) -> hidden (B, 1 + N, dim)``, or ``(B, 1 + K, dim)`` when given
    the ``K`` patch positions to keep (MAE's encoder runs on those only).

    Row 0 is the class token. Patches are embedded by :class:`PatchEmbedding` and get fixed
    2-D sin-cos positions (``model.positions`` must be ``sincos``); the class token has
    none. With ``model.embedding_norm`` a norm runs over ``[cls, patches]`` before the core
    (CLIP's ViT: its ``ln_pre``); off by default. The core is bidirectional.
    ``cls_token=False`` builds the ViT without a class token (I-JEPA's): the rows are the
    patches alone, ``(B, N or K, dim)``, and only ``pooled(images, "mean")`` applies.

    Images of another size than ``vision.image_size`` (a multiple of the patch size: DINO's
    local crops, fine-tuning at a higher resolution) get the sin-cos positions of the
    training grid's extent at fractional coordinates
    (:func:`~lmssl.nn.sincos_positions_2d` with ``extent``), computed once per size.
    """

    def __init__(self, cfg: ModelConfig, vision: VisionConfig, cls_token: bool = True) -> None:
        super().__init__()
        if cfg.positions != "sincos":
            raise ValueError(f"the vision backbone uses fixed 2-D sin-cos positions; set model.positions=sincos "
                             f"(got '{cfg.positions}')")
        if vision.image_size % vision.patch_size:
            raise ValueError(f"vision.image_size={vision.image_size} must be a multiple of "
                             f"vision.patch_size={vision.patch_size}")
        self.cfg, self.vision = cfg, vision
        self.grid = (vision.image_size // vision.patch_size,) * 2  # (gh, gw)
        self.patches = PatchEmbedding(vision.patch_size, vision.channels, cfg.dim, bias=cfg.bias)
        self.register_buffer("positions", sincos_positions_2d(*self.grid, cfg.dim) * vision.position_scale,
                             persistent=False)  # (N, dim)
        self._other_grids: dict[tuple[int, int], torch.Tensor] = {}  # (gh, gw) -> (gh * gw, dim), CPU float32
        self.cls = nn.Parameter(torch.zeros(cfg.dim)) if cls_token else None
        self.embed_norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps, cfg.bias) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.core = Transformer(cfg)
        init_weights(self, cfg)
        if self.cls is not None:
            nn.init.normal_(self.cls, 0.0, vision.cls_init_std if vision.cls_init_std >= 0 else cfg.init_std)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, N, p * p * C)``, checking the geometry against the config."""
        C, H, W = images.shape[1:]
        v = self.vision
        if C != v.channels or H % v.patch_size or W % v.patch_size:
            raise ValueError(f"images of shape {tuple(images.shape[1:])} given to a model configured for "
                             f"{v.channels} channel(s) and {v.patch_size}x{v.patch_size} patches; resize the images "
                             "to a multiple of the patch size or set vision.*")
        return patchify(images, v.patch_size)

    def positions_for(self, height: int, width: int) -> torch.Tensor:
        """The ``(N, dim)`` position table of an image of ``height x width`` pixels."""
        grid = (height // self.vision.patch_size, width // self.vision.patch_size)
        if grid == self.grid:
            return self.positions
        if grid not in self._other_grids:
            self._other_grids[grid] = sincos_positions_2d(*grid, self.cfg.dim, extent=self.grid) * self.vision.position_scale
        return self._other_grids[grid].to(self.positions.device)

    def embed(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens with positions ``(B, N or K, dim)``; with ``keep_idx (B, K)`` only
        the kept patches are embedded."""
        patches = self.patchify(images)  # (B, N, p*p*C)
        table = self.positions_for(images.shape[2], images.shape[3])
        positions = table.to(patches.dtype).expand(patches.shape[0], -1, -1)  # (B, N, dim)
        if keep_idx is not None:
            patches, positions = gather_tokens(patches, keep_idx), gather_tokens(positions, keep_idx)
        return self.patches(patches) + positions

    @property
    def prefix(self) -> int:
        """Rows before the patches in the output: 1 (the class token) or 0."""
        return 0 if self.cls is None else 1

    def with_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the class token: ``(B, L, dim) -> (B, 1 + L, dim)`` (unchanged without one)."""
        if self.cls is None:
            return x
        return torch.cat([self.cls.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)

    def forward(self, images: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(self.embed(images, keep_idx))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The core over ``[cls, tokens]`` (normed first with ``model.embedding_norm``):
        ``(B, L, dim) -> (B, prefix + L, dim)``."""
        x = self.with_cls(tokens)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.core(self.drop(x), is_causal=False)

    def pooled(self, images: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """``images (B, C, H, W) -> (B, dim)``: the class token's final state (``cls``) or the
        mean of the patch states (``mean``)."""
        if pool == "cls" and self.cls is None:
            raise ValueError("this ViT has no class token (cls_token=False): pool the patches with pool='mean'")
        h = self(images)  # (B, prefix + N, dim)
        return h[:, 0] if pool == "cls" else h[:, self.prefix:].mean(dim=1)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (the class token counted as embedding)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.cls.numel() if non_embedding and self.cls is not None else n


@torch.no_grad()
def xavier_patch_init_(backbone: VisionBackbone) -> VisionBackbone:
    """Re-initialise the patch embedding as MAE's reference code does: xavier-uniform on the
    ``(dim, p * p * C)`` projection (its bias stays zero).

    The default N(0, 0.02) suits wide patches (16 x 16 x 3 = 768 inputs: each token's image part
    has a spread of about 0.55) but not small ones: on 4 x 4 greyscale patches (16 inputs) it is
    0.08 against the fixed sin-cos positions' entries of up to 1, so every image looks nearly the
    same to a fresh network (the held-out features' spread, ``std_ratio``, is 0.03-0.05 on the
    bundled images) and a method that bootstraps from its own outputs (DINO, I-JEPA) starts from
    almost constant targets. Xavier gives the image part a spread of ``sqrt(2 n / (n + dim))`` for
    ``n = p * p * C`` inputs: 0.34 for 4 x 4 greyscale patches into 256 features, 1.0 for 16 x 16 x 3
    into 768 (``std_ratio`` at initialisation: 0.19-0.21 on the bundled images)."""
    nn.init.xavier_uniform_(backbone.patches.weight)  # (dim, p * p * C)
    return backbone


def image_backbone(cfg: ModelConfig, vision: VisionConfig) -> nn.Module:
    """The backbone ``model.family`` names, with ``pooled(images, pool) -> (B, D)`` and ``dim``:
    a :class:`VisionBackbone` (``vit``) or a torchvision-named
    :class:`~lmssl.models.resnet.ResNet` (``resnet``: depth ``model.n_layers``, stem
    ``model.stem``)."""
    if cfg.family == "resnet":
        from lmssl.models.resnet import ResNet

        return ResNet(cfg.n_layers, cfg.stem, vision.channels)
    return VisionBackbone(cfg, vision)


@torch.no_grad()
def forward_flops(module: nn.Module, example: torch.Tensor) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward pass of ``module`` on ``example``, counted
    over its convolutions and linear layers (what dominates a convnet), per example row."""
    total = [0.0]

    def count(m, inputs, output):
        if isinstance(m, nn.Conv2d):
            total[0] += 2.0 * output.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total[0] += 2.0 * output.numel() * m.in_features

    hooks = [m.register_forward_hook(count) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = module.training
    module.eval()
    try:
        module(example)
    finally:
        module.train(was_training)
        for h in hooks:
            h.remove()
    return total[0] / example.shape[0]
