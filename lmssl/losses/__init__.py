"""Loss functions: pure functions that hold the math, thin modules that hold settings.

Vocabulary (``vocab``): cross-entropy fused with the vocabulary projection, in row
chunks. Contrastive (``contrastive``): InfoNCE, SimCLR's NT-Xent, a CLIP-style learned
temperature. Distributed helpers (``distributed``): an all-gather that keeps gradients. Pixels
(``pixel``): MAE's per-patch mean squared error, optionally on normalised patches.
"""

from lmssl.losses.contrastive import (
    InfoNCELoss,
    LearnedTemperature,
    NTXentLoss,
    info_nce,
    info_nce_with_accuracy,
    nt_xent,
    nt_xent_with_accuracy,
    similarity_logits,
)
from lmssl.losses.distributed import gather_with_grad, rank_offset
from lmssl.losses.pixel import normalize_patches, patch_mse
from lmssl.losses.vocab import linear_cross_entropy

__all__ = [
    "InfoNCELoss",
    "LearnedTemperature",
    "NTXentLoss",
    "gather_with_grad",
    "info_nce",
    "info_nce_with_accuracy",
    "linear_cross_entropy",
    "normalize_patches",
    "nt_xent",
    "nt_xent_with_accuracy",
    "patch_mse",
    "rank_offset",
    "similarity_logits",
]
