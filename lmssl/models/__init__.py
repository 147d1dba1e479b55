"""The shared core and its wrappers: models map tensors to tensors and know nothing of objectives."""

from lmssl.models.heads import LMHead
from lmssl.models.presets import PRESETS
from lmssl.models.text import TextBackbone
from lmssl.models.transformer import (Block, Transformer, eval_mode, init_weights,
                                     set_activation_checkpointing)
from lmssl.models.vision import VisionBackbone

__all__ = ["Block", "Transformer", "TextBackbone", "VisionBackbone", "LMHead", "PRESETS", "eval_mode", "init_weights",
           "set_activation_checkpointing"]
