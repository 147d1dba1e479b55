"""Loss functions: pure functions that hold the math, thin modules that hold settings.

Vocabulary (``vocab``): cross-entropy fused with the vocabulary projection, in row
chunks. Contrastive (``contrastive``): InfoNCE, SimCLR's NT-Xent, a CLIP-style learned
temperature. Distributed helpers (``distributed``): an all-gather that keeps gradients. Pixels
(``pixel``): MAE's per-patch mean squared error, optionally on normalised patches. VICReg
(``vicreg``): invariance, variance and covariance terms over the global batch. BYOL
(``regression``): normalised regression of predictions on detached targets.
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
from lmssl.losses.regression import byol_loss, normalized_regression
from lmssl.losses.vicreg import VICRegLoss, covariance_loss, invariance_loss, variance_loss, vicreg_loss
from lmssl.losses.vocab import linear_cross_entropy

__all__ = [
    "InfoNCELoss",
    "LearnedTemperature",
    "NTXentLoss",
    "VICRegLoss",
    "byol_loss",
    "covariance_loss",
    "gather_with_grad",
    "info_nce",
    "info_nce_with_accuracy",
    "invariance_loss",
    "linear_cross_entropy",
    "normalize_patches",
    "normalized_regression",
    "nt_xent",
    "nt_xent_with_accuracy",
    "patch_mse",
    "rank_offset",
    "similarity_logits",
    "variance_loss",
    "vicreg_loss",
]
