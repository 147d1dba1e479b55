"""Building blocks of the shared transformer core, one concept per file."""

from lmssl.nn.attention import Attention, local_attention_mask
from lmssl.nn.embeddings import PatchEmbedding, TokenEmbedding, patchify, unpatchify
from lmssl.nn.mlp import MLP
from lmssl.nn.norm import make_norm
from lmssl.nn.positional import LearnedPositions, RotaryEmbedding, sincos_positions, sincos_positions_2d

__all__ = ["Attention", "local_attention_mask", "MLP", "make_norm", "LearnedPositions", "PatchEmbedding", "RotaryEmbedding", "TokenEmbedding",
           "patchify", "sincos_positions", "sincos_positions_2d", "unpatchify"]
