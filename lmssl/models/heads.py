"""Output heads: vocabulary logits for language models, and the MLP projector / predictor
heads that the joint-embedding image methods (SimCLR, BYOL, VICReg, DINO) put on a backbone."""

from __future__ import annotations

import torch
from torch import nn

from lmssl.config import ModelConfig
from lmssl.nn import make_norm
from lmssl.nn.mlp import ACTIVATIONS


class LMHead(nn.Module):
    """``hidden (..., dim) -> logits (..., padded_vocab)``.

    Optionally a transform first (dense, activation, norm: the BERT MLM head), then the
    vocabulary projection, tied to the token embedding when ``tie_embeddings``. Callers
    that want logits only at some positions select those rows first (masked-only MLM).
    The projection reads vectors as wide as the embedding (``embedding_dim``, when it is
    set): the transform maps ``dim`` to that width (ELECTRA's generator head).
    """

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        width = embedding.weight.shape[1]  # what the vocabulary projection reads
        if width != cfg.dim and not cfg.head_transform:
            raise ValueError(f"an LM head over {width}-wide embeddings from {cfg.dim}-wide states needs "
                             "model.head_transform=true (its dense layer maps one width to the other)")
        if cfg.head_transform:
            self.dense = nn.Linear(cfg.dim, width, bias=cfg.bias)
            self.act = ACTIVATIONS[cfg.activation]
            self.norm = make_norm(cfg.norm, width, cfg.norm_eps, cfg.bias)
            nn.init.normal_(self.dense.weight, 0.0, cfg.init_std)
            if self.dense.bias is not None:
                nn.init.zeros_(self.dense.bias)
        else:
            self.dense = None
        rows = embedding.weight.shape[0]
        if cfg.tie_embeddings:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty(rows, width).normal_(0.0, cfg.init_std))
        self.bias = nn.Parameter(torch.zeros(rows)) if cfg.head_bias else None

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """What comes before the vocabulary projection (identity without ``head_transform``).
        Objectives that fuse projection and loss (:mod:`lmssl.losses.vocab`) call this, then
        use ``weight`` and ``bias`` themselves."""
        return self.norm(self.act(self.dense(h))) if self.dense is not None else h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.transform(h), self.weight, self.bias)


class MLPHead(nn.Module):
    """``(B, in_dim) -> (B, out_dim)`` through ``layers`` linear maps, each but the last
    followed by batch norm (``batch_norm``) and ReLU: SimCLR's projector (2 layers), BYOL's
    projector and predictor (2 layers, 4096 hidden in the paper), VICReg's expander (3 layers,
    8192 wide). ``last_bn``: a batch norm without affine parameters on the output (SimCLR v2,
    solo-learn's VICReg/Barlow heads use one; BYOL does not). Linear layers before a batch
    norm carry no bias (the norm's shift replaces it)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, batch_norm: bool = True,
                 last_bn: bool = False) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"MLPHead needs at least one layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        parts: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            last = i == layers - 1
            parts.append(nn.Linear(a, b, bias=not (batch_norm and not last) and not (last and last_bn)))
            if not last:
                parts += [nn.BatchNorm1d(b)] if batch_norm else []
                parts.append(nn.ReLU(inplace=True))
            elif last_bn:
                parts.append(nn.BatchNorm1d(b, affine=False))
        self.net = nn.Sequential(*parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021): ``(B, in_dim) -> (B, out_dim)`` logits over
    ``out_dim`` prototypes.

    An MLP of ``layers`` linear maps (``in_dim -> hidden_dim -> ... -> bottleneck_dim``, GELU
    between them; with ``batch_norm`` a batch norm before each GELU, the official code's
    ``use_bn_in_head``, off for its ViTs), the output L2-normalised, then
    a weight-normalised linear layer without bias onto the prototypes. Its weight norm is fixed
    at 1 (the paper's code freezes ``weight_g`` at 1), so the layer is written here directly:
    each prototype is the unit vector ``prototypes[k] / |prototypes[k]|`` and a logit is a cosine
    similarity. Only the directions of the rows of ``prototypes`` matter; their length (which
    weight decay would shrink) changes nothing in the output.

    ``forward(x, prototype_grad)``: with a 0-dim float ``prototype_grad`` (on the device), the
    gradient that reaches ``prototypes`` is multiplied by it; DINO freezes the last layer for the
    first epoch by passing 0 there. The parameter stays in the graph, so DDP sees it used.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, out_dim: int = 65536,
                 layers: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"DINOHead needs at least one layer, got {layers}")
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        parts: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            parts.append(nn.Linear(a, b))
            if i < layers - 1:
                parts += [nn.BatchNorm1d(b)] if batch_norm else []
                parts.append(nn.GELU())
        self.mlp = nn.Sequential(*parts)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))  # (K, bottleneck), rows normalised in use
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor, prototype_grad: torch.Tensor | None = None) -> torch.Tensor:
        z = nn.functional.normalize(self.mlp(x), dim=-1)  # (B, bottleneck), unit rows
        w = self.prototypes
        if prototype_grad is not None:  # same values; the gradient to w is scaled by prototype_grad
            w = w.detach() + (w - w.detach()) * prototype_grad.to(w.dtype)
        return nn.functional.linear(z, nn.functional.normalize(w, dim=-1))  # (B, K) cosine similarities
