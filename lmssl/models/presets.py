"""Named architecture and size presets. A recipe's ``model.preset`` fills these fields.

Each family maps exactly onto one ``transformers`` class at export: ``gpt2`` ->
GPT2LMHeadModel, ``llama`` -> LlamaForCausalLM, ``bert`` -> BertForMaskedLM, ``modernbert``
-> ModernBertForMaskedLM; ``vit`` is the encoder of ViTMAEForPreTraining (image geometry
lives in the ``vision`` config section).
"""

from __future__ import annotations

GPT2 = dict(family="gpt2", norm="layernorm", norm_eps=1e-5, norm_position="pre", activation="gelu_tanh",
            gated_mlp=False, positions="learned", bias=True, tie_embeddings=True, type_vocab_size=0,
            embedding_norm=False, head_transform=False, head_bias=False, causal=True, mlp_hidden=0, n_kv_heads=0)
LLAMA = dict(family="llama", norm="rmsnorm", norm_eps=1e-5, norm_position="pre", activation="silu",
             gated_mlp=True, positions="rope", rope_theta=10000.0, bias=False, tie_embeddings=True,
             type_vocab_size=0, embedding_norm=False, head_transform=False, head_bias=False, causal=True)
BERT = dict(family="bert", norm="layernorm", norm_eps=1e-12, norm_position="post", activation="gelu",
            gated_mlp=False, positions="learned", bias=True, tie_embeddings=True, type_vocab_size=2,
            embedding_norm=True, head_transform=True, head_bias=True, causal=False, mlp_hidden=0, n_kv_heads=0)
# ModernBERT: pre-norm LayerNorm without biases, a norm after the embeddings and none before block 0's
# attention, GeGLU (exact GELU on the first half of fc1, times the second), RoPE, bidirectional, BERT-style
# MLM head (dense, GELU, norm; tied decoder with a bias). Every third block (0, 3, 6, ...) attends globally
# with RoPE base 160000; the others attend within 64 tokens either side with base 10000.
MODERNBERT = dict(family="modernbert", norm="layernorm", norm_eps=1e-5, norm_position="pre", activation="gelu",
                  gated_mlp=True, positions="rope", rope_theta=160000.0, bias=False, tie_embeddings=True,
                  type_vocab_size=0, embedding_norm=True, first_attn_norm=False, local_attention=128, global_every=3,
                  local_rope_theta=10000.0, head_transform=True, head_bias=True, causal=False, n_kv_heads=0)
# ViT encoder (MAE's): pre-norm LayerNorm, exact GELU, fixed 2-D sin-cos positions, bidirectional.
VIT = dict(family="vit", norm="layernorm", norm_eps=1e-6, norm_position="pre", activation="gelu", gated_mlp=False,
           positions="sincos", bias=True, tie_embeddings=False, type_vocab_size=0, embedding_norm=False,
           head_transform=False, head_bias=False, causal=False, mlp_hidden=0, n_kv_heads=0)
# A torchvision-named ResNet for the joint-embedding image methods (n_layers is the depth, dim
# the pooled feature width); its state dict loads into torchvision.models.resnetNN.
RESNET = dict(family="resnet", norm="layernorm", positions="none", causal=False, bias=False)
# A modern encoder: pre-norm, RMSNorm, SwiGLU, RoPE, bidirectional. No exact transformers twin.
ENCODER = dict(LLAMA, family="custom", causal=False)


def _size(dim: int, n_layers: int, n_heads: int, max_positions: int, **extra) -> dict:
    return dict(dim=dim, n_layers=n_layers, n_heads=n_heads, max_positions=max_positions, **extra)


PRESETS: dict[str, dict] = {
    # laptop sizes: train on the bundled corpus on a CPU in minutes
    "gpt_tiny": {**GPT2, **_size(256, 4, 4, 256)},
    "llama_tiny": {**LLAMA, **_size(256, 4, 4, 256, n_kv_heads=2, mlp_hidden=704)},
    "bert_tiny": {**BERT, **_size(256, 4, 4, 256)},
    "encoder_tiny": {**ENCODER, **_size(256, 4, 4, 256, mlp_hidden=704)},
    "vit_tiny": {**VIT, **_size(256, 4, 4, 256)},
    "resnet18_cifar": {**RESNET, "dim": 512, "n_layers": 18, "n_heads": 1, "stem": "cifar"},  # 32 px images and less
    # MLP width 1.5 x dim, ModernBERT-base's ratio (768 -> 1152); blocks 0 and 3 global, 1 and 2 local
    "modernbert_tiny": {**MODERNBERT, **_size(256, 4, 4, 512, mlp_hidden=384)},
    # reference sizes for GPUs
    "gpt2": {**GPT2, **_size(768, 12, 12, 1024)},
    "gpt2_medium": {**GPT2, **_size(1024, 24, 16, 1024)},
    "llama_small": {**LLAMA, **_size(768, 12, 12, 2048, n_kv_heads=4, mlp_hidden=2048)},
    "bert_base": {**BERT, **_size(768, 12, 12, 512)},
    "modernbert_base": {**MODERNBERT, **_size(768, 22, 12, 8192, mlp_hidden=1152)},  # answerdotai/ModernBERT-base's shape
    "vit_base": {**VIT, **_size(768, 12, 12, 256)},
    "resnet18": {**RESNET, "dim": 512, "n_layers": 18, "n_heads": 1, "stem": "imagenet"},
    "resnet50": {**RESNET, "dim": 2048, "n_layers": 50, "n_heads": 1, "stem": "imagenet"},
}
