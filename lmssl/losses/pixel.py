"""Pixel regression for masked image modelling (MAE): mean squared error over patches."""

from __future__ import annotations

from torch import Tensor

__all__ = ["normalize_patches", "patch_mse"]


def normalize_patches(patches: Tensor, eps: float = 1e-6) -> Tensor:
    """Each patch's pixels minus their mean, over ``sqrt(var + eps)`` (unbiased variance,
    as MAE's ``norm_pix_loss``): ``(..., P) -> (..., P)``."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def patch_mse(pred: Tensor, target: Tensor, normalize_target: bool = False) -> Tensor:
    """Mean over patches of the per-patch mean squared error.

    ``pred`` and ``target``: ``(..., P)`` with ``P`` pixel values per patch, already
    restricted to the patches that are scored (MAE scores the hidden ones only). With
    ``normalize_target`` the target is :func:`normalize_patches` first. Computed in float32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"patch_mse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.float()
    if normalize_target:
        target = normalize_patches(target)
    return (pred.float() - target).pow(2).mean()
