"""lmssl weights -> stock ``transformers`` models, one exact twin per architecture family.

A *converter* turns a trained objective (an ``nn.Module`` with ``.backbone`` and usually
``.head``) into a :class:`Converted`: the ``transformers`` class, its config and a state
dict whose names and shapes that class expects. Converters are registered per
``(objective, family)``::

    clm + gpt2   -> GPT2LMHeadModel   (AutoModelForCausalLM)
    clm + llama  -> LlamaForCausalLM  (AutoModelForCausalLM)
    mlm + bert   -> BertForMaskedLM   (AutoModelForMaskedLM; AutoModel gives BertModel)
    mlm + modernbert -> ModernBertForMaskedLM (AutoModelForMaskedLM; AutoModel gives ModernBertModel)
    electra + electra / bert -> ElectraForPreTraining (the discriminator; AutoModel gives ElectraModel),
                     the generator as ElectraForMaskedLM in ``generator/``
    electra + modernbert -> ModernBertModel (the pre-norm discriminator's body; its head and the generator stay in the checkpoint)
    cpc + bert / modernbert -> BertModel / ModernBertModel (the segment encoder; the context network has no twin)
    mae + vit    -> ViTMAEForPreTraining (AutoModelForPreTraining; AutoModel gives ViTMAEModel)
    ijepa + vit  -> IJepaModel        (the target encoder: no class token, the sin-cos table as its positions)
    *   + vit    -> ViTModel          (the backbone of every image objective without a converter of its own)
    clip + vit   -> CLIPModel + CLIPProcessor (both towers, checked by the converter's own config_problems)

Any registered folder also loads with ``AutoModel`` as the bare backbone (GPT2Model,
LlamaModel, BertModel, ModernBertModel). An objective whose useful product is the backbone alone (CPC)
registers with :func:`backbone_converter`, which maps ``.backbone`` of any family onto the
bare ``transformers`` model::

    register("cpc", "llama", head=False)(backbone_converter)

Before mapping, :func:`check_family` compares every architecture field of the run's
``ModelConfig`` with what the ``transformers`` class computes; a run whose family was
overridden into something the class cannot express (a GPT-2 with RMSNorm, say) has no
exact twin and is refused with one line naming the field.

Weight layouts (lmssl -> transformers):

- the embedding table is padded to ``pad_vocab_multiple`` rows in lmssl; only the
  tokenizer's ``vocab_size`` rows (and head-bias entries) are exported;
- lmssl's fused ``attn.qkv`` holds queries for ``n_heads`` heads, then keys and values for
  ``n_kv_heads`` heads: GPT-2 and ModernBERT keep it fused (``c_attn``, ``Wqkv``), Llama and
  BERT split it;
- GPT-2 uses ``Conv1D`` layers, which store weights as ``(in, out)``: transposed;
- a gated ``mlp.fc1`` outputs ``[gate, up]`` concatenated: Llama's ``gate_proj``/``up_proj``;
  ModernBERT keeps it whole as ``Wi``, whose first half ("input") is the activated one too;
- RoPE uses the same half-split layout in all of them, so q/k weights need no permutation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmssl.config import ModelConfig, RunConfig
from lmssl.errors import UserError


@dataclass
class Converted:
    """A ``transformers`` model ready to build: ``model_class(config)`` then ``load_state_dict(state_dict)``."""

    model_class: type  # e.g. transformers.GPT2LMHeadModel
    config: object  # its PretrainedConfig (architectures, token ids and vocabulary filled in)
    state_dict: dict[str, torch.Tensor]  # complete: tied weights appear under both names
    kind: str  # "causal-lm" | "masked-lm" | "backbone": what the verification compares
    pipeline_tag: str | None  # Hub pipeline of the folder: text-generation | fill-mask | feature-extraction
    notes: list[str] = field(default_factory=list)  # lines for the model card (what differs, what is fresh)
    fresh: tuple[str, ...] = ()  # name prefixes the transformers class adds and lmssl has no weights for
    # lmssl's hidden states ``(ids, mask) -> (B, T, dim)`` that AutoModel must reproduce;
    # None: ``objective.backbone`` with the attention direction of ``kind``
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    positions: int | None = None  # positions of the exported model when fewer than model.max_positions
    # ``check(objective, cfg, folder) -> {check name: max |difference|}`` for folders that do not
    # take token ids (images); None: the text check of lmssl.export.core.verify
    check: Callable[[nn.Module, RunConfig, object], dict[str, float]] | None = None
    usage: str = ""  # the "How to use" code of the model card, with {name} for the folder/Hub name; "": the text default
    # more safetensors files written beside the model (name -> state dict), e.g. a ResNet's torchvision weights
    extra_files: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    # ``write(folder)``: more files the converter writes itself, after the tokenizer and before the
    # model (CLIP's processor: the image processor beside the tokenizer, which it rewrites)
    write: Callable[[Path], None] | None = None
    card: str = ""  # more markdown for the model card (CLIP: its zero-shot table)
    probe_length: int = 32  # tokens per row of the verification batch (longer than a local-attention window)


Converter = Callable[[nn.Module, RunConfig, object], Converted]
REGISTRY: dict[tuple[str, str], tuple[Converter, bool]] = {}  # (objective, family) -> (converter, maps a head)
FAMILIES = ("gpt2", "llama", "bert", "modernbert", "electra", "vit", "resnet", "custom")


def register(objective: str, family: str, head: bool = True) -> Callable[[Converter], Converter]:
    """Decorator: ``converter(objective_module, cfg, tokenizer) -> Converted`` for runs of
    ``objective`` whose ``model.family`` is ``family`` (``objective="*"``: every objective
    without a converter of its own). ``head=False``: the converter maps the backbone only,
    so the head fields of the config are not checked."""

    def deco(fn: Converter) -> Converter:
        REGISTRY[(objective, family)] = (fn, head)
        return fn

    return deco


class NoExactTwin(UserError):
    """No converter exists for this objective and family (the caller exports lmssl weights instead)."""


class FamilyMismatch(UserError):
    """The run names a family but its config deviates from what that transformers class computes."""


def find_converter(cfg: RunConfig) -> Converter:
    """The converter for this run, after checking its config matches the family exactly.

    Raises :class:`UserError` for an unknown family, :class:`NoExactTwin` when the family
    is ``custom`` or the objective has no mapping for it, and :class:`FamilyMismatch`
    naming the first field that deviates from the family."""
    family, objective = cfg.model.family, cfg.objective
    if family not in FAMILIES:
        raise UserError(f"unknown architecture family model.family='{family}' in this run; lmssl exports "
                        f"{', '.join(FAMILIES[:-1])} to transformers and 'custom' as lmssl weights")
    key = (objective, family) if (objective, family) in REGISTRY else ("*", family)
    if key not in REGISTRY:
        pairs = ", ".join(f"{o}+{f}" for o, f in sorted(REGISTRY))
        raise NoExactTwin(f"no exact transformers equivalent for objective '{objective}' with family '{family}' "
                          f"(exact twins: {pairs})")
    converter, head = REGISTRY[key]
    # a converter may check the run's config itself (``converter.config_problems(cfg) -> [str]``),
    # e.g. CLIP, whose two towers each have their own layout; the others are checked by family
    own_check = getattr(converter, "config_problems", None)
    problems = own_check(cfg) if own_check is not None else check_family(cfg.model, head)
    if problems:
        raise FamilyMismatch(f"no exact transformers equivalent for this '{family}' run: {problems[0]}"
                             + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return converter


# ----------------------------------------------------------------------------- family checks

# Activations each transformers family can express, by lmssl name -> its ACT2FN name.
_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu", "relu": "relu"}
_ACT_LLAMA = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}

# Field values the transformers class hard-codes, per family (backbone, then LM head).
# Fields not listed map onto a config value (sizes, eps, activation, dropout, rope_theta,
# mlp_hidden, tie_embeddings; Llama's and ModernBERT's bias; BERT's type_vocab_size and
# head bias; ModernBERT's local_attention, global_every, local_rope_theta and head bias).
_NO_LOCAL = dict(first_attn_norm=True, local_attention=0)  # every block normed and global
_FIXED: dict[str, dict[str, object]] = {
    "gpt2": dict(norm="layernorm", norm_position="pre", gated_mlp=False, positions="learned", bias=True,
                 type_vocab_size=0, embedding_norm=False, causal=True, **_NO_LOCAL),
    "llama": dict(norm="rmsnorm", norm_position="pre", gated_mlp=True, positions="rope", type_vocab_size=0,
                  embedding_norm=False, causal=True, **_NO_LOCAL),
    "bert": dict(norm="layernorm", norm_position="post", gated_mlp=False, positions="learned", bias=True,
                 embedding_norm=True, causal=False, **_NO_LOCAL),
    # ELECTRA: BERT's layout, with embeddings model.embedding_dim wide projected to dim (embeddings_project)
    "electra": dict(norm="layernorm", norm_position="post", gated_mlp=False, positions="learned", bias=True,
                    embedding_norm=True, causal=False, **_NO_LOCAL),
    "modernbert": dict(norm="layernorm", norm_position="pre", gated_mlp=True, positions="rope", type_vocab_size=0,
                       embedding_norm=True, first_attn_norm=False, causal=False),
    "vit": dict(norm="layernorm", norm_position="pre", gated_mlp=False, positions="sincos", bias=True,
                type_vocab_size=0, embedding_norm=False, causal=False, **_NO_LOCAL),
}
_PROJECTED_EMBEDDINGS = ("electra",)  # families whose embeddings may be narrower than dim (embeddings_project)
_FIXED_HEAD: dict[str, dict[str, object]] = {
    "gpt2": dict(head_transform=False, head_bias=False),
    "llama": dict(head_transform=False, head_bias=False),
    "bert": dict(head_transform=True),
    "electra": dict(head_transform=True),
    "modernbert": dict(head_transform=True),
    "vit": {},
}


def check_family(m: ModelConfig, head: bool = True) -> list[str]:
    """Every way ``m`` differs from what its family's transformers class computes (empty: exact).
    ``head=False`` checks the backbone fields only."""
    if m.family == "resnet":  # torchvision's layout whatever the other fields say; the stem is checked on export
        return []
    if m.family not in _FIXED:
        return [f"model.family='{m.family}' has no transformers class"]
    fixed = {**_FIXED[m.family], **(_FIXED_HEAD[m.family] if head else {})}
    problems = [f"model.{k}={getattr(m, k)!r} but {m.family} needs {v!r}"
                for k, v in fixed.items() if getattr(m, k) != v]
    if m.family in ("gpt2", "bert", "modernbert", "vit") and m.n_kv_heads not in (0, m.n_heads):
        problems.append(f"model.n_kv_heads={m.n_kv_heads} (grouped-query attention) but {m.family} has one "
                        "key/value head per query head")
    if m.dim % m.n_heads:
        problems.append(f"model.dim={m.dim} is not a multiple of model.n_heads={m.n_heads}")
    if m.embedding_dim not in (0, m.dim) and m.family not in _PROJECTED_EMBEDDINGS:
        problems.append(f"model.embedding_dim={m.embedding_dim} (embeddings projected to model.dim={m.dim}) but "
                        f"{m.family} embeds at the hidden width; only {', '.join(_PROJECTED_EMBEDDINGS)} projects them")
    return problems


# ----------------------------------------------------------------------------- shared helpers


def _token_ids(tokenizer) -> dict[str, int | None]:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(bos_token_id=bos, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}


def _split_qkv(w: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused ``(nh + 2 nkv) * hs`` rows (or entries, for a bias) -> q, k, v."""
    hs = m.dim // m.n_heads
    nkv = m.n_kv_heads or m.n_heads
    return w.split([m.n_heads * hs, nkv * hs, nkv * hs], dim=0)


def _head_weight(s: dict[str, torch.Tensor], m: ModelConfig, head_prefix: str = "head.") -> torch.Tensor:
    """The vocabulary projection ``(vocab, dim)``: the embedding when tied."""
    w = s["backbone.tokens.weight"] if m.tie_embeddings else s[head_prefix + "weight"]
    return w[: m.vocab_size]


def _mlp_hidden(m: ModelConfig) -> int:
    from lmssl.models.transformer import mlp_hidden

    return mlp_hidden(m)


# ----------------------------------------------------------------------------- backbones


# Per-block name tables for layouts that keep lmssl's modules one to one (biases included):
# "q", "k", "v" are the three parts of the fused ``attn.qkv``; other keys are lmssl module paths.
_BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "attn.proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "norm2": "output.LayerNorm"}
_VIT_LAYER = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
              "attn.proj": "attention.o_proj", "norm1": "layernorm_before", "norm2": "layernorm_after",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _blocks(s: dict[str, torch.Tensor], m: ModelConfig, src: str, dst: str,
            names: dict[str, str]) -> dict[str, torch.Tensor]:
    """Blocks ``{src}{i}.`` of the shared core -> ``{dst}{i}.`` by a name table, weights and biases."""
    out = {}
    for i in range(m.n_layers):
        b, h = f"{src}{i}.", f"{dst}{i}."
        for part in ("weight", "bias"):
            qkv = dict(zip("qkv", _split_qkv(s[f"{b}attn.qkv.{part}"], m)))
            for ours, theirs in names.items():
                out[f"{h}{theirs}.{part}"] = qkv[ours] if ours in qkv else s[f"{b}{ours}.{part}"]
    return out


def gpt2_backbone(s: dict[str, torch.Tensor], m: ModelConfig, src: str = "backbone.", dst: str = "") -> dict[str, torch.Tensor]:
    """lmssl TextBackbone (GPT-2 family) -> GPT2Model names under ``dst``; Conv1D weights are ``(in, out)``."""
    out = {f"{dst}wte.weight": s[f"{src}tokens.weight"][: m.vocab_size],
           f"{dst}wpe.weight": s[f"{src}positions.weight"],
           f"{dst}ln_f.weight": s[f"{src}core.norm.weight"],
           f"{dst}ln_f.bias": s[f"{src}core.norm.bias"]}
    for i in range(m.n_layers):
        b, h = f"{src}core.blocks.{i}.", f"{dst}h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[h + theirs + ".weight"] = s[b + ours + ".weight"]
            out[h + theirs + ".bias"] = s[b + ours + ".bias"]
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[h + theirs + ".weight"] = s[b + ours + ".weight"].t().contiguous()
            out[h + theirs + ".bias"] = s[b + ours + ".bias"]
    return out


def llama_backbone(s: dict[str, torch.Tensor], m: ModelConfig, src: str = "backbone.", dst: str = "") -> dict[str, torch.Tensor]:
    """lmssl TextBackbone (Llama family) -> LlamaModel names under ``dst``: split qkv and [gate, up]."""
    hidden = _mlp_hidden(m)
    out = {f"{dst}embed_tokens.weight": s[f"{src}tokens.weight"][: m.vocab_size],
           f"{dst}norm.weight": s[f"{src}core.norm.weight"]}
    for i in range(m.n_layers):
        b, h = f"{src}core.blocks.{i}.", f"{dst}layers.{i}."
        out[h + "input_layernorm.weight"] = s[b + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = s[b + "norm2.weight"]
        for part in ("weight", "bias") if m.bias else ("weight",):
            q, k, v = _split_qkv(s[f"{b}attn.qkv.{part}"], m)
            out[f"{h}self_attn.q_proj.{part}"], out[f"{h}self_attn.k_proj.{part}"] = q, k
            out[f"{h}self_attn.v_proj.{part}"] = v
            out[f"{h}self_attn.o_proj.{part}"] = s[f"{b}attn.proj.{part}"]
            gate, up = s[f"{b}mlp.fc1.{part}"].split([hidden, hidden], dim=0)
            out[f"{h}mlp.gate_proj.{part}"], out[f"{h}mlp.up_proj.{part}"] = gate, up
            out[f"{h}mlp.down_proj.{part}"] = s[f"{b}mlp.fc2.{part}"]
    return out


def _copy(out: dict[str, torch.Tensor], s: dict[str, torch.Tensor], src: str, dst: str, bias: bool) -> None:
    """``out[dst.weight] = s[src.weight]`` (and the bias, when ``bias``)."""
    for part in ("weight", "bias") if bias else ("weight",):
        out[f"{dst}.{part}"] = s[f"{src}.{part}"]


def modernbert_backbone(s: dict[str, torch.Tensor], m: ModelConfig, src: str = "backbone.",
                        dst: str = "") -> dict[str, torch.Tensor]:
    """lmssl TextBackbone (ModernBERT family) -> ModernBertModel names under ``dst``.

    One to one: the fused ``qkv`` is ``Wqkv`` (q, k, v rows, as ModernBERT views it
    ``(3, heads, head_dim)``), the gated ``fc1`` is ``Wi``; block 0 has no ``attn_norm``."""
    out = {f"{dst}embeddings.tok_embeddings.weight": s[f"{src}tokens.weight"][: m.vocab_size]}
    _copy(out, s, f"{src}embed_norm", f"{dst}embeddings.norm", m.bias)
    _copy(out, s, f"{src}core.norm", f"{dst}final_norm", m.bias)
    for i in range(m.n_layers):
        b, h = f"{src}core.blocks.{i}.", f"{dst}layers.{i}."
        names = [("attn.qkv", "attn.Wqkv"), ("attn.proj", "attn.Wo"), ("norm2", "mlp_norm"), ("mlp.fc1", "mlp.Wi"),
                 ("mlp.fc2", "mlp.Wo")] + ([("norm1", "attn_norm")] if i > 0 else [])
        for ours, theirs in names:
            _copy(out, s, b + ours, h + theirs, m.bias)
    return out


def bert_backbone(s: dict[str, torch.Tensor], m: ModelConfig, src: str = "backbone.", dst: str = "") -> dict[str, torch.Tensor]:
    """lmssl TextBackbone (BERT family, post-norm) -> BertModel names under ``dst`` (no pooler).

    A run without token-type embeddings gets one all-zero type row: BERT always adds one."""
    e = f"{dst}embeddings."
    types = s.get(f"{src}token_types.weight", torch.zeros(1, m.embedding_dim or m.dim))
    out = {e + "word_embeddings.weight": s[f"{src}tokens.weight"][: m.vocab_size],
           e + "position_embeddings.weight": s[f"{src}positions.weight"],
           e + "token_type_embeddings.weight": types,
           e + "LayerNorm.weight": s[f"{src}embed_norm.weight"],
           e + "LayerNorm.bias": s[f"{src}embed_norm.bias"]}
    return out | _blocks(s, m, f"{src}core.blocks.", f"{dst}encoder.layer.", _BERT_LAYER)


# ----------------------------------------------------------------------------- configs


def gpt2_config(m: ModelConfig, tokenizer, architecture: str):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_positions, n_embd=m.dim, n_layer=m.n_layers,
                      n_head=m.n_heads, n_inner=_mlp_hidden(m), activation_function=_ACT[m.activation],
                      resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
                      layer_norm_epsilon=m.norm_eps, initializer_range=m.init_std, scale_attn_weights=True,
                      tie_word_embeddings=m.tie_embeddings, architectures=[architecture], **_token_ids(tokenizer))


def llama_config(m: ModelConfig, tokenizer, architecture: str):
    from transformers import LlamaConfig

    # Llama has no residual or embedding dropout: cfg.model.dropout maps to attention dropout only.
    return LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=_mlp_hidden(m),
                       num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                       num_key_value_heads=m.n_kv_heads or m.n_heads, head_dim=m.dim // m.n_heads,
                       hidden_act=_ACT_LLAMA[m.activation], max_position_embeddings=m.max_positions,
                       rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, attention_bias=m.bias, mlp_bias=m.bias,
                       attention_dropout=m.dropout, initializer_range=m.init_std,
                       tie_word_embeddings=m.tie_embeddings, architectures=[architecture], **_token_ids(tokenizer))


def bert_config(m: ModelConfig, tokenizer, architecture: str):
    from transformers import BertConfig

    ids = _token_ids(tokenizer)
    return BertConfig(vocab_size=m.vocab_size, hidden_size=m.dim, num_hidden_layers=m.n_layers,
                      num_attention_heads=m.n_heads, intermediate_size=_mlp_hidden(m), hidden_act=_ACT[m.activation],
                      hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout,
                      max_position_embeddings=m.max_positions, type_vocab_size=max(1, m.type_vocab_size),
                      layer_norm_eps=m.norm_eps, initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings,
                      position_embedding_type="absolute",  # read by transformers 4.x; 5.x has only absolute
                      architectures=[architecture], pad_token_id=ids["pad_token_id"])


def modernbert_config(m: ModelConfig, tokenizer, architecture: str):
    """``ModernBertConfig``: one ``bias`` for ModernBERT's four flags, ``head_bias`` for the
    decoder's; ``layer_types`` spells out which blocks are local. The pre-5.x keys
    (``global_attn_every_n_layers``, ``global_rope_theta``, ``local_rope_theta``) are written
    too, so older ``transformers`` read the same layout. ``classifier_pooling="mean"``: lmssl
    pretrains on packed text with no class token in front, so a sequence classifier should
    average the tokens (the first token only knows about itself; measured in recipes/README.md)."""
    from transformers import ModernBertConfig

    local = [m.local_attention > 0 and i % m.global_every != 0 for i in range(m.n_layers)]
    every = m.global_every if any(local) else 1
    local_theta = m.local_rope_theta or m.rope_theta
    act = _ACT_LLAMA[m.activation]
    ids = _token_ids(tokenizer)
    config = ModernBertConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=_mlp_hidden(m), num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, hidden_activation=act, classifier_activation=act,
        max_position_embeddings=m.max_positions, initializer_range=m.init_std, norm_eps=m.norm_eps,
        norm_bias=m.bias, attention_bias=m.bias, mlp_bias=m.bias, classifier_bias=m.bias, decoder_bias=m.head_bias,
        attention_dropout=m.dropout, embedding_dropout=m.dropout, mlp_dropout=m.dropout,
        layer_types=["sliding_attention" if x else "full_attention" for x in local],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": m.rope_theta},
                         "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}},
        **({"local_attention": m.local_attention} if any(local) else {}), global_attn_every_n_layers=every,
        tie_word_embeddings=m.tie_embeddings, architectures=[architecture], pad_token_id=ids["pad_token_id"],
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, classifier_pooling="mean")
    config.global_rope_theta, config.local_rope_theta = m.rope_theta, local_theta
    return config


# (backbone mapping, config builder, bare transformers class name) per family
BACKBONES = {
    "gpt2": (gpt2_backbone, gpt2_config, "GPT2Model"),
    "llama": (llama_backbone, llama_config, "LlamaModel"),
    "bert": (bert_backbone, bert_config, "BertModel"),
    "modernbert": (modernbert_backbone, modernbert_config, "ModernBertModel"),
}


# ----------------------------------------------------------------------------- converters


def _causal_lm(class_name: str, backbone, make_config, prefix: str) -> Converter:
    """A decoder with an LM head: ``backbone`` maps the core under ``prefix``, plus ``lm_head``."""

    def convert(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
        import transformers

        m = cfg.model
        s = _state(objective)
        sd = backbone(s, m, dst=prefix)
        sd["lm_head.weight"] = _head_weight(s, m)
        return Converted(getattr(transformers, class_name), make_config(m, tokenizer, class_name), sd,
                         "causal-lm", "text-generation")

    return convert


gpt2_lm = register("clm", "gpt2")(_causal_lm("GPT2LMHeadModel", gpt2_backbone, gpt2_config, "transformer."))
llama_lm = register("clm", "llama")(_causal_lm("LlamaForCausalLM", llama_backbone, llama_config, "model."))


@register("mlm", "bert")
def bert_mlm(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    import transformers

    m = cfg.model
    s = _state(objective)
    sd = bert_backbone(s, m, dst="bert.")
    p = "cls.predictions."
    sd[p + "transform.dense.weight"], sd[p + "transform.dense.bias"] = s["head.dense.weight"], s["head.dense.bias"]
    sd[p + "transform.LayerNorm.weight"], sd[p + "transform.LayerNorm.bias"] = s["head.norm.weight"], s["head.norm.bias"]
    sd[p + "decoder.weight"] = _head_weight(s, m)
    bias = s["head.bias"][: m.vocab_size] if m.head_bias else torch.zeros(m.vocab_size)
    sd[p + "bias"] = sd[p + "decoder.bias"] = bias
    notes = [] if m.head_bias else ["the vocabulary bias is zero (the lmssl head had none)"]
    notes.append("`AutoModel` loads the bare `BertModel`; its pooler was not pretrained (lmssl has no NSP) "
                 "and is freshly initialised: use `last_hidden_state`")
    return Converted(transformers.BertForMaskedLM, bert_config(m, tokenizer, "BertForMaskedLM"), sd,
                     "masked-lm", "fill-mask", notes)


@register("mlm", "modernbert")
def modernbert_mlm(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    import transformers

    m = cfg.model
    s = _state(objective)
    sd = modernbert_backbone(s, m, dst="model.")
    _copy(sd, s, "head.dense", "head.dense", m.bias)
    _copy(sd, s, "head.norm", "head.norm", m.bias)
    sd["decoder.weight"] = _head_weight(s, m)
    if m.head_bias:
        sd["decoder.bias"] = s["head.bias"][: m.vocab_size]
    notes = ["`AutoModel` loads the bare `ModernBertModel`. `AutoModelForSequenceClassification` keeps the pretrained "
             "`head` (dense, activation, norm) and adds a fresh classifier; it averages the tokens (the config's "
             "`classifier_pooling=\"mean\"`), since this model was pretrained on packed text with no class token in "
             "front"]
    if m.dropout > 0:
        notes.append("ModernBERT drops out inside the MLP, before `Wo`; lmssl dropped out after its output projection "
                     "(the same model at inference)")
    return Converted(transformers.ModernBertForMaskedLM, modernbert_config(m, tokenizer, "ModernBertForMaskedLM"), sd,
                     "masked-lm", "fill-mask", notes, probe_length=_probe_length(m))


def _probe_length(m: ModelConfig) -> int:
    """A verification batch longer than the local-attention window, so the window is checked."""
    return max(32, m.local_attention + 8) if m.local_attention > 0 else 32


def backbone_converter(objective: nn.Module, cfg: RunConfig, tokenizer, module: nn.Module | None = None,
                       model_cfg: ModelConfig | None = None) -> Converted:
    """The bare backbone of any family with a twin (GPT2Model / LlamaModel / BertModel /
    ModernBertModel), for
    objectives whose heads have no transformers counterpart. Register it per family, e.g.
    ``register("cpc", "gpt2", head=False)(backbone_converter)``; the verification compares
    hidden states. ``module``/``model_cfg`` name another TextBackbone than
    ``objective.backbone`` / ``cfg.model`` (e.g. a CPC encoder and its config)::

        register("cpc", "bert", head=False)(
            lambda obj, cfg, tok: backbone_converter(obj, cfg, tok, obj.encoder, obj.encoder_cfg))
    """
    import transformers

    m = model_cfg if model_cfg is not None else cfg.model
    module = module if module is not None else objective.backbone
    problems = check_family(m, head=False)
    if problems:
        raise FamilyMismatch(f"no exact transformers equivalent for this backbone: {problems[0]}")
    mapping, make_config, class_name = BACKBONES[m.family]
    sd = mapping(_state(module), m, src="")
    notes, fresh = [], ()
    if class_name == "BertModel":
        notes.append("the pooler was not pretrained and is freshly initialised: use `last_hidden_state`")
        fresh = ("pooler.",)
    return Converted(getattr(transformers, class_name), make_config(m, tokenizer, class_name), sd, "backbone",
                     "feature-extraction", notes, fresh,
                     reference=lambda ids, mask: module(ids, mask, is_causal=m.causal), positions=m.max_positions,
                     probe_length=_probe_length(m))


@register("cpc", "modernbert", head=False)
@register("cpc", "bert", head=False)
def cpc_bert(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """CPC: the segment encoder as ``BertModel`` or ``ModernBertModel`` (bidirectional,
    ``cpc.segment_len`` positions).
    The causal context network runs over segment latents, not tokens, and has no
    ``transformers`` class; it and the predictors stay in the run's checkpoint."""
    conv = backbone_converter(objective, cfg, tokenizer, objective.encoder, objective.encoder_cfg)
    L = cfg.cpc.segment_len
    conv.notes[:0] = [
        f"this is the CPC segment encoder: it reads segments of up to {L} tokens; a segment's latent z is the mean "
        "of `last_hidden_state` over its tokens (cut longer text into segments of that length)",
        "the causal context network and the per-offset predictors have no transformers equivalent; they stay in the "
        "run's checkpoint (`model.safetensors`, tensors `context.*` and `predictors.*`)"]
    return conv


# ----------------------------------------------------------------------------- MAE (vision)


def vit_mae_config(m: ModelConfig, vision, mae):
    """``ViTMAEConfig`` of the same shape as ``lmssl.objectives.mae.MAE(m, vision, mae)``."""
    from transformers import ViTMAEConfig

    from lmssl.models.transformer import mlp_hidden

    return ViTMAEConfig(hidden_size=m.dim, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                        intermediate_size=mlp_hidden(m), hidden_act=_ACT[m.activation], hidden_dropout_prob=m.dropout,
                        attention_probs_dropout_prob=m.dropout, initializer_range=m.init_std,
                        layer_norm_eps=m.norm_eps, image_size=vision.image_size, patch_size=vision.patch_size,
                        num_channels=vision.channels, qkv_bias=m.bias, decoder_num_attention_heads=mae.decoder_heads,
                        decoder_hidden_size=mae.decoder_dim, decoder_num_hidden_layers=mae.decoder_layers,
                        decoder_intermediate_size=4 * mae.decoder_dim, mask_ratio=mae.mask_ratio,
                        norm_pix_loss=mae.norm_pix_loss, architectures=["ViTMAEForPreTraining"])


def vit_mae_pretraining(objective: nn.Module) -> tuple[object, dict[str, torch.Tensor]]:
    """An ``lmssl.objectives.mae.MAE`` -> ``(ViTMAEConfig, state dict)`` for ViTMAEForPreTraining.

    The patch embedding's ``(dim, p * p * C)`` weight becomes the ``(dim, C, p, p)``
    convolution; the fixed sin-cos tables are written with a zero row for the class token.
    """
    from lmssl.nn import sincos_positions_2d

    if objective.encoder_mask_token is not None:
        raise NoExactTwin("an MAE whose encoder sees mask tokens (mae.encoder_mask_token) has no ViTMAE twin")
    m, vision, mae = objective.cfg, objective.vision, objective.mae
    s = _state(objective)
    table = torch.cat([torch.zeros(1, mae.decoder_dim), sincos_positions_2d(*objective.encoder.grid, mae.decoder_dim)])
    out = vit_backbone_state(objective.encoder, dst="vit.")
    out |= {"decoder.mask_token": s["mask_token"].view(1, 1, -1), "decoder.decoder_pos_embed": table[None],
            "decoder.decoder_norm.weight": s["decoder.norm.weight"], "decoder.decoder_norm.bias": s["decoder.norm.bias"]}
    for ours, theirs in (("decoder_embed", "decoder.decoder_embed"), ("pred", "decoder.decoder_pred")):
        out[f"{theirs}.weight"], out[f"{theirs}.bias"] = s[f"{ours}.weight"], s[f"{ours}.bias"]
    out |= _blocks(s, objective.decoder_cfg, "decoder.blocks.", "decoder.decoder_layers.", _VIT_LAYER)
    return vit_mae_config(m, vision, mae), out


def vit_config(m: ModelConfig, vision, architecture: str = "ViTModel"):
    """``ViTConfig`` of the same shape as :class:`lmssl.models.VisionBackbone`."""
    from transformers import ViTConfig

    from lmssl.models.transformer import mlp_hidden

    return ViTConfig(hidden_size=m.dim, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                     intermediate_size=mlp_hidden(m), hidden_act=_ACT[m.activation], hidden_dropout_prob=m.dropout,
                     attention_probs_dropout_prob=m.dropout, initializer_range=m.init_std, layer_norm_eps=m.norm_eps,
                     image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.channels,
                     qkv_bias=m.bias, architectures=[architecture])


def _position_table(backbone: nn.Module) -> torch.Tensor:
    """A :class:`~lmssl.models.VisionBackbone`'s fixed ``(N, dim)`` position table as it adds
    it (the sin-cos table times ``vision.position_scale``), float32 on the CPU."""
    return backbone.positions.detach().float().cpu().clone()


def vit_backbone_state(backbone: nn.Module, dst: str = "") -> dict[str, torch.Tensor]:
    """A :class:`~lmssl.models.VisionBackbone` state dict -> ``ViTModel`` names under ``dst``.

    The patch embedding's ``(dim, p * p * C)`` weight becomes the ``(dim, C, p, p)``
    convolution; the fixed sin-cos positions (times ``vision.position_scale``) become the
    position table, with a zero row for the class token (which has no position in lmssl)."""
    m, vision = backbone.cfg, backbone.vision
    s = _state(backbone)
    p, C = vision.patch_size, vision.channels
    table = torch.cat([torch.zeros(1, m.dim), _position_table(backbone)])[None]  # (1, 1 + N, dim)
    out = {f"{dst}embeddings.cls_token": s["cls"].view(1, 1, -1),
           f"{dst}embeddings.position_embeddings": table,
           f"{dst}embeddings.patch_embeddings.projection.weight":
               s["patches.weight"].view(m.dim, p, p, C).permute(0, 3, 1, 2).contiguous(),
           f"{dst}embeddings.patch_embeddings.projection.bias": s["patches.bias"],
           f"{dst}layernorm.weight": s["core.norm.weight"], f"{dst}layernorm.bias": s["core.norm.bias"]}
    out |= _blocks(s, m, "core.blocks.", f"{dst}layers.", _VIT_LAYER)
    return out


def _random_images(vision, n: int = 2) -> torch.Tensor:
    return torch.randn(n, vision.channels, vision.image_size, vision.image_size,
                       generator=torch.Generator().manual_seed(1234))


@torch.no_grad()
def check_vit_backbone(backbone: nn.Module, folder) -> dict[str, float]:
    """Reload ``folder`` with ``AutoModel`` and compare its hidden states with ``backbone``'s."""
    import transformers

    images = _random_images(backbone.vision)
    model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    theirs = model(pixel_values=images).last_hidden_state  # (B, 1 + N, dim)
    transformers.AutoImageProcessor.from_pretrained(str(folder))  # loads
    return {f"hidden states ({type(model).__name__})": float((backbone(images) - theirs).abs().max())}


VIT_USAGE = """from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{name}")
model = AutoModel.from_pretrained("{name}")  # ViTModel
inputs = processor(images=image, return_tensors="pt")  # image: a PIL image
hidden = model(**inputs).last_hidden_state  # (1, 1 + patches, dim)
features = {pooled}  # what lmssl's monitors and probe read"""


@register("*", "vit", head=False)
def vit_model(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """The ViT backbone of any image objective as ``ViTModel`` (``AutoModel``); fine-tunes
    through ``ViTForImageClassification``, which reads the class token."""
    import transformers

    backbone = objective.backbone
    pool = getattr(objective, "pool", "cls")
    pooled = "hidden[:, 0]  # the class token" if pool == "cls" else "hidden[:, 1:].mean(dim=1)  # mean of the patches"
    notes = ["the pooler (dense + tanh) was not pretrained and is freshly initialised: use `last_hidden_state`",
             f"lmssl's features for this run are {'the class token' if pool == 'cls' else 'the mean of the patch states'}"
             " of `last_hidden_state`",
             "the image processor resizes to the training size without cropping"]
    return Converted(transformers.ViTModel, vit_config(cfg.model, cfg.vision), vit_backbone_state(backbone),
                     "image-backbone", "image-feature-extraction", notes, ("pooler.",),
                     check=lambda obj, c, folder: check_vit_backbone(obj.backbone, folder),
                     usage=VIT_USAGE.replace("{pooled}", pooled))


@torch.no_grad()
def check_mae(objective: nn.Module, cfg: RunConfig, folder) -> dict[str, float]:
    """Reload ``folder`` (``AutoModelForPreTraining``, ``AutoModel``) and compare with the lmssl
    MAE on two random images under one mask (ViTMAE's ``noise`` argument), in float32."""
    import transformers

    images = _random_images(cfg.vision)
    keep_idx, restore_idx = objective.draw_mask(2, torch.Generator().manual_seed(99))
    noise = torch.rand(2, objective.encoder.num_patches, generator=torch.Generator().manual_seed(99))  # the same draw
    checks = {}
    model = transformers.AutoModelForPreTraining.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = objective.pred(objective.decode(images, keep_idx, restore_idx))  # (B, N, p*p*C)
    theirs = model(pixel_values=images, noise=noise).logits
    checks[f"pixel predictions ({type(model).__name__})"] = float((ours - theirs).abs().max())
    del model
    model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    theirs = model(pixel_values=images, noise=noise).last_hidden_state  # (B, 1 + K, dim)
    checks["encoder hidden states (AutoModel)"] = float((objective.encoder(images, keep_idx) - theirs).abs().max())
    transformers.AutoImageProcessor.from_pretrained(str(folder))  # loads
    return checks


MAE_USAGE = """from transformers import AutoModelForPreTraining, AutoImageProcessor

processor = AutoImageProcessor.from_pretrained("{name}")
model = AutoModelForPreTraining.from_pretrained("{name}")
inputs = processor(images=image, return_tensors="pt")  # image: a PIL image
out = model(**inputs)  # out.loss; out.logits: the pixels predicted for every patch"""


@register("mae", "vit")
def mae_vit(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """MAE: encoder, decoder and pixel head as ``ViTMAEForPreTraining`` (no tokenizer: images)."""
    import transformers

    config, sd = vit_mae_pretraining(objective)
    n = (cfg.vision.image_size // cfg.vision.patch_size) ** 2
    notes = [f"`AutoModel` loads the encoder (`ViTMAEModel`), which hides {cfg.mae.mask_ratio:.0%} of the patches at "
             "random on every call, as in pretraining. For features of whole images in patch order, set "
             f"`model.config.mask_ratio = 0.0` and pass `noise=torch.arange({n}.0).expand(batch_size, -1)`",
             "the image processor resizes to the training size without cropping; lmssl's held-out images were the "
             "largest centred square, resized"]
    return Converted(transformers.ViTMAEForPreTraining, config, sd, "mae", "image-feature-extraction", notes,
                     check=check_mae, usage=MAE_USAGE)


# ----------------------------------------------------------------------------- ResNet (vision)


@torch.no_grad()
def check_resnet(objective: nn.Module, cfg: RunConfig, folder) -> dict[str, float]:
    """Reload the torchvision-named weights into a fresh ResNet (strict) and, for the ImageNet
    stem, ``AutoModel`` (``ResNetModel``); compare pooled features with the run's backbone."""
    import transformers
    from safetensors.torch import load_file

    from lmssl.models.resnet import ResNet

    backbone = objective.backbone.eval()
    images = _random_images(cfg.vision)
    name = f"torchvision_resnet{backbone.depth}.safetensors"
    fresh = ResNet(backbone.depth, backbone.stem, backbone.in_channels).eval()
    fresh.load_state_dict(load_file(str(Path(folder) / name)), strict=True)
    checks = {f"pooled features ({name}, torchvision names)": float((fresh(images) - backbone(images)).abs().max())}
    if backbone.stem == "imagenet":
        model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        theirs = model(pixel_values=images).pooler_output.flatten(1)
        checks[f"pooled features ({type(model).__name__})"] = float((theirs - backbone(images)).abs().max())
    transformers.AutoImageProcessor.from_pretrained(str(folder))  # loads
    return checks


RESNET_USAGE = """from safetensors.torch import load_file
import torch, torchvision

model = torchvision.models.resnet{depth}()
{stem}model.fc = torch.nn.Identity()  # the self-supervised backbone has no classifier
model.load_state_dict(load_file("{{name}}/torchvision_resnet{depth}.safetensors"))
features = model(images)  # (batch, {dim}) pooled features, images normalised as preprocessor_config.json says"""
RESNET_HF_USAGE = """

# or with transformers (this folder):
from transformers import AutoImageProcessor, AutoModel
model = AutoModel.from_pretrained("{name}")  # ResNetModel
features = model(**AutoImageProcessor.from_pretrained("{name}")(images=image, return_tensors="pt")).pooler_output"""


@register("*", "resnet", head=False)
def resnet_model(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """A ResNet backbone: its torchvision state dict (``torchvision_resnetNN.safetensors``, any
    stem) and, for the ImageNet stem, ``ResNetModel`` (``AutoModel``), an exact twin. The
    CIFAR stem (3x3 convolution, no max-pool) has no ``transformers`` class: the folder then
    holds the torchvision weights and the image processor only."""
    import transformers

    from lmssl.models.resnet import to_hf_resnet, torchvision_state_dict

    backbone = objective.backbone
    tv = torchvision_state_dict(backbone)
    stem = "" if backbone.stem == "imagenet" and backbone.in_channels == 3 else (
        f"model.conv1 = torch.nn.Conv2d({backbone.in_channels}, 64, kernel_size=3, stride=1, padding=1, bias=False)\n"
        "model.maxpool = torch.nn.Identity()\n" if backbone.stem == "cifar" else
        f"model.conv1 = torch.nn.Conv2d({backbone.in_channels}, 64, kernel_size=7, stride=2, padding=3, bias=False)\n")
    usage = RESNET_USAGE.format(depth=backbone.depth, stem=stem, dim=backbone.num_features)
    extra = {f"torchvision_resnet{backbone.depth}.safetensors": tv}
    notes = [f"`torchvision_resnet{backbone.depth}.safetensors` loads into `torchvision.models.resnet{backbone.depth}` "
             "(the card shows how; no classifier `fc`)"]
    if backbone.stem != "imagenet":
        notes.append("the CIFAR stem (3x3 convolution, no max-pool) has no transformers class, so this folder holds "
                     "the torchvision weights and the image processor only")
        return Converted(None, None, {}, "image-backbone", "image-feature-extraction", notes, check=check_resnet,
                         usage=usage, extra_files=extra)
    config, sd = to_hf_resnet(backbone)
    config.architectures = ["ResNetModel"]
    return Converted(transformers.ResNetModel, config, sd, "image-backbone", "image-feature-extraction", notes,
                     check=check_resnet, usage=usage + RESNET_HF_USAGE, extra_files=extra)


# ----------------------------------------------------------------------------- I-JEPA (vision)


def ijepa_config(m: ModelConfig, vision):
    """``IJepaConfig`` of the same shape as a :class:`~lmssl.models.VisionBackbone` without a class token."""
    from transformers import IJepaConfig

    from lmssl.models.transformer import mlp_hidden

    return IJepaConfig(hidden_size=m.dim, num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                       intermediate_size=mlp_hidden(m), hidden_act=_ACT[m.activation], hidden_dropout_prob=m.dropout,
                       attention_probs_dropout_prob=m.dropout, initializer_range=m.init_std,
                       layer_norm_eps=m.norm_eps, image_size=vision.image_size, patch_size=vision.patch_size,
                       num_channels=vision.channels, qkv_bias=m.bias, architectures=["IJepaModel"])


def ijepa_backbone_state(backbone: nn.Module, dst: str = "") -> dict[str, torch.Tensor]:
    """A :class:`~lmssl.models.VisionBackbone` built without a class token -> ``IJepaModel`` names.

    ``IJepaModel`` has no class token and a learned ``(1, N, dim)`` position table, which gets
    the fixed sin-cos positions; the patch embedding's ``(dim, p * p * C)`` weight becomes the
    ``(dim, C, p, p)`` convolution; the blocks and the final LayerNorm map one to one."""
    if getattr(backbone, "cls", None) is not None:
        raise NoExactTwin("IJepaModel has no class token; this ViT has one (export it as ViTModel)")
    m, vision = backbone.cfg, backbone.vision
    s = _state(backbone)
    p, C = vision.patch_size, vision.channels
    out = {f"{dst}embeddings.position_embeddings": _position_table(backbone)[None],  # (1, N, dim)
           f"{dst}embeddings.patch_embeddings.projection.weight":
               s["patches.weight"].view(m.dim, p, p, C).permute(0, 3, 1, 2).contiguous(),
           f"{dst}embeddings.patch_embeddings.projection.bias": s["patches.bias"],
           f"{dst}layernorm.weight": s["core.norm.weight"], f"{dst}layernorm.bias": s["core.norm.bias"]}
    return out | _blocks(s, m, "core.blocks.", f"{dst}layers.", _VIT_LAYER)


@torch.no_grad()
def check_ijepa(objective: nn.Module, cfg: RunConfig, folder) -> dict[str, float]:
    """Reload ``folder`` with ``AutoModel`` (``IJepaModel``) and compare its hidden states, and
    their patch mean (the run's features), with the target encoder's on two random images."""
    import transformers

    images = _random_images(cfg.vision)
    model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    theirs = model(pixel_values=images).last_hidden_state  # (B, N, dim)
    ours = objective.backbone(images)  # (B, N, dim)
    transformers.AutoImageProcessor.from_pretrained(str(folder))  # loads
    return {f"hidden states ({type(model).__name__})": float((ours - theirs).abs().max()),
            "features: patch mean": float((ours.mean(dim=1) - theirs.mean(dim=1)).abs().max())}


IJEPA_USAGE = """from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{name}")
model = AutoModel.from_pretrained("{name}")  # IJepaModel
inputs = processor(images=image, return_tensors="pt")  # image: a PIL image
hidden = model(**inputs).last_hidden_state  # (1, patches, dim): no class token
features = hidden.mean(dim=1)  # what lmssl's monitors and probe read"""


@register("ijepa", "vit", head=False)
def ijepa_model(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """I-JEPA: the target encoder (the EMA network the paper evaluates) as ``IJepaModel``
    (``AutoModel``); fine-tunes through ``IJepaForImageClassification``, which averages the
    patch states as lmssl's features do. The context encoder and the predictor stay in the run."""
    import transformers

    notes = ["this is the I-JEPA target encoder (the exponential moving average of the context encoder), the network "
             "the paper evaluates; the context encoder and the predictor stay in the run's checkpoint",
             "there is no class token: lmssl's features are the mean of `last_hidden_state` over the patches, which "
             "`IJepaForImageClassification` also classifies",
             "the position table holds the fixed 2-D sin-cos positions lmssl trained with; at another image size "
             "`interpolate_pos_encoding=True` resizes it bicubically, where lmssl would compute sin-cos positions at "
             "fractional coordinates (close, not identical)",
             "the image processor resizes to the training size without cropping"]
    return Converted(transformers.IJepaModel, ijepa_config(cfg.model, cfg.vision),
                     ijepa_backbone_state(objective.backbone), "image-backbone", "image-feature-extraction", notes,
                     check=check_ijepa, usage=IJEPA_USAGE)


# ----------------------------------------------------------------------------- ELECTRA


def electra_backbone(s: dict[str, torch.Tensor], m: ModelConfig, src: str = "backbone.",
                     dst: str = "") -> dict[str, torch.Tensor]:
    """lmssl TextBackbone (ELECTRA family) -> ElectraModel names under ``dst``: BERT's layout
    (``embeddings.*`` at ``embedding_dim``, ``encoder.layer.*``), plus ``embeddings_project``
    when the embeddings are narrower (or wider) than ``dim``."""
    out = bert_backbone(s, m, src, dst)
    if (m.embedding_dim or m.dim) != m.dim:
        _copy(out, s, f"{src}embed_project", f"{dst}embeddings_project", True)
    return out


def electra_config(m: ModelConfig, tokenizer, architecture: str):
    """``ElectraConfig`` of the same shape as a TextBackbone of the ELECTRA (or BERT) family."""
    from transformers import ElectraConfig

    return ElectraConfig(vocab_size=m.vocab_size, embedding_size=m.embedding_dim or m.dim, hidden_size=m.dim,
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         intermediate_size=_mlp_hidden(m), hidden_act=_ACT[m.activation],
                         hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout,
                         max_position_embeddings=m.max_positions, type_vocab_size=max(1, m.type_vocab_size),
                         layer_norm_eps=m.norm_eps, initializer_range=m.init_std,
                         pad_token_id=_token_ids(tokenizer)["pad_token_id"], tie_word_embeddings=True,
                         architectures=[architecture])


BACKBONES["electra"] = (electra_backbone, electra_config, "ElectraModel")


def electra_generator(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """An ``lmssl.objectives.electra.Electra``'s generator -> ``ElectraForMaskedLM``: its blocks
    and ``embeddings_project``, the shared embeddings, ``generator_predictions`` (dense to the
    embedding width, GELU, LayerNorm) and the decoder tied to the token embedding, with its bias."""
    import transformers

    g = objective.gen_cfg
    s = _state(objective)
    sd = electra_backbone(s, g, src="generator.", dst="electra.")
    _copy(sd, s, "generator_head.dense", "generator_predictions.dense", True)
    _copy(sd, s, "generator_head.norm", "generator_predictions.LayerNorm", True)
    sd["generator_lm_head.weight"] = _head_weight(s, g, "generator_head.")
    sd["generator_lm_head.bias"] = s["generator_head.bias"][: g.vocab_size] if g.head_bias else torch.zeros(g.vocab_size)
    return Converted(transformers.ElectraForMaskedLM, electra_config(g, tokenizer, "ElectraForMaskedLM"), sd,
                     "masked-lm", "fill-mask")


ELECTRA_USAGE = """from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{name}")
discriminator = AutoModelForPreTraining.from_pretrained("{name}")  # ElectraForPreTraining
inputs = tokenizer("And God said, Let there be light", return_tensors="pt")
replaced = discriminator(**inputs).logits > 0  # (1, tokens): True where a token looks replaced
hidden = discriminator.electra(**inputs).last_hidden_state  # (1, tokens, dim); lmssl's features: hidden.mean(dim=1)

generator = AutoModelForMaskedLM.from_pretrained("{name}", subfolder="generator")  # ElectraForMaskedLM
# fine-tuning: AutoModelForSequenceClassification.from_pretrained("{name}") (ElectraForSequenceClassification)"""


@register("electra", "bert", head=False)
@register("electra", "electra", head=False)
def electra_pretraining(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """ELECTRA: the discriminator as ``ElectraForPreTraining`` (``AutoModelForPreTraining``;
    ``AutoModel`` gives ``ElectraModel``) and the generator as ``ElectraForMaskedLM`` in the
    folder's ``generator/`` (written by :func:`write_generator`), both compared with lmssl by
    :func:`check_electra`."""
    import transformers

    m = cfg.model
    if m.activation != "gelu":
        raise FamilyMismatch(f"model.activation={m.activation!r} but ElectraForMaskedLM's generator head applies exact "
                             "GELU ('gelu'); train with model.activation=gelu")
    s = _state(objective)
    sd = electra_backbone(s, m, dst="electra.")
    _copy(sd, s, "detector.dense", "discriminator_predictions.dense", True)
    _copy(sd, s, "detector.out", "discriminator_predictions.dense_prediction", True)
    generator = electra_generator(objective, cfg, tokenizer)
    g = objective.gen_cfg
    notes = [f"`generator/` holds the generator, a {g.n_layers}-layer, {g.dim}-wide `ElectraForMaskedLM` that shares "
             "the discriminator's embeddings (load it with `subfolder=\"generator\"`); the discriminator is the model "
             "to fine-tune",
             "lmssl's features for this run are the mean of the discriminator's `last_hidden_state` over the tokens",
             "`AutoModelForSequenceClassification` gives `ElectraForSequenceClassification`, whose fresh classifier "
             "reads the first token; this model was pretrained on packed text with no class token in front"]
    return Converted(transformers.ElectraForPreTraining, electra_config(m, tokenizer, "ElectraForPreTraining"), sd,
                     "pretraining", "feature-extraction", notes, usage=ELECTRA_USAGE,
                     write=lambda folder: write_generator(folder, generator), check=check_electra)


@register("electra", "modernbert", head=False)
def electra_modernbert(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """ELECTRA with a ModernBERT (pre-norm) discriminator: its body as ``ModernBertModel``
    (``AutoModelForSequenceClassification`` / ``AutoModelForTokenClassification`` add fresh heads
    over it), compared on hidden states. ``transformers`` has no ModernBERT class for a
    replaced-token head, nor an embedding projection for a generator narrower than the shared
    embeddings, so the detector and the generator stay in the run's checkpoint."""
    conv = backbone_converter(objective, cfg, tokenizer)
    g = objective.gen_cfg
    conv.notes[:0] = [
        "this is the ELECTRA discriminator's body (pre-norm ModernBERT), the model to fine-tune; lmssl's features "
        "for this run are the mean of its `last_hidden_state` over the tokens",
        f"the replaced-token head (`detector.*`) and the {g.n_layers}-layer, {g.dim}-wide generator (`generator.*`, "
        "`generator_head.*`) have no ModernBERT class in transformers; they stay in the run's checkpoint "
        "(`model.safetensors`); `model.family=electra` exports both as ElectraForPreTraining / ElectraForMaskedLM"]
    return conv


def write_generator(folder, generator: Converted) -> None:
    """``generator`` (``ElectraForMaskedLM``) and a copy of the folder's tokenizer into ``folder/generator``."""
    import shutil

    from lmssl.export.core import build_model, quiet_transformers

    folder = Path(folder)
    sub = folder / "generator"
    sub.mkdir(exist_ok=True)
    model = build_model(generator)
    with quiet_transformers():
        model.save_pretrained(str(sub))
    for f in folder.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, sub / f.name)


@torch.no_grad()
def check_electra(objective: nn.Module, cfg: RunConfig, folder) -> dict[str, float]:
    """Reload the folder (the discriminator) and ``generator/`` with the Auto classes and compare
    with the lmssl networks on the probe batch, in float32: discriminator logits, discriminator
    hidden states, generator logits."""
    import transformers

    from lmssl.export.core import probe_batch

    folder = Path(folder)
    sub = folder / "generator"
    ids, mask = probe_batch(cfg)
    real = mask.bool()
    V = cfg.model.vocab_size

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float()[real] - b.float()[real]).abs().max())

    checks = {}
    model = transformers.AutoModelForPreTraining.from_pretrained(str(folder), dtype=torch.float32).eval()
    theirs = model(input_ids=ids, attention_mask=mask).logits  # (B, T)
    checks[f"discriminator logits ({type(model).__name__})"] = diff(objective.discriminator_logits(ids, mask), theirs)
    model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    theirs = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, dim)
    checks["discriminator hidden states (AutoModel)"] = diff(objective.hidden(ids, mask), theirs)
    model = transformers.AutoModelForMaskedLM.from_pretrained(str(sub), dtype=torch.float32).eval()
    theirs = model(input_ids=ids, attention_mask=mask).logits[..., :V]  # (B, T, V)
    checks[f"generator logits ({type(model).__name__}, generator/)"] = diff(objective.generator_logits(ids, mask), theirs)
    return checks


# ----------------------------------------------------------------------------- CLIP (image-text)

# lmssl block -> CLIPEncoderLayer names (both towers)
_CLIP_LAYER = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "attn.proj": "self_attn.out_proj", "norm1": "layer_norm1", "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# exact activations: CLIPMLP calls ACT2FN[hidden_act]
_ACT_EXACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}


def clip_config_problems(cfg: RunConfig) -> list[str]:
    """Every way a CLIP run's two towers differ from ``CLIPModel`` (empty: an exact twin).

    Both towers: pre-norm LayerNorm blocks with an ungated MLP, one key/value head per query
    head, every block global. The image tower (``model``): a ViT with the LayerNorm before its
    encoder (``model.embedding_norm=true``, CLIP's ``pre_layrnorm``), pooled at its class token;
    its sin-cos positions are written into CLIP's learned table. The text tower (``clip.text``):
    learned, sin-cos or no absolute positions (a learned table either way), no embedding norm,
    no token types. Missing biases are exported as zeros."""
    c, v, t = cfg.clip, cfg.model, cfg.clip.text
    problems = []
    for m, key, tower in ((v, "model", "vision"), (t, "clip.text", "text")):
        need = dict(norm="layernorm", norm_position="pre", gated_mlp=False, first_attn_norm=True, local_attention=0)
        need |= dict(family="vit", positions="sincos", embedding_norm=True) if tower == "vision" else \
            dict(embedding_norm=False, type_vocab_size=0)
        for k, want in need.items():
            if getattr(m, k) != want:
                hint = " (CLIP's LayerNorm before the encoder, pre_layrnorm)" if k == "embedding_norm" and want else ""
                problems.append(f"{key}.{k}={getattr(m, k)!r} but CLIP's {tower} tower needs {want!r}{hint}")
        if tower == "text" and m.positions not in ("learned", "sincos", "none"):
            problems.append(f"clip.text.positions={m.positions!r} but CLIP's text tower has absolute positions "
                            "(learned, sincos or none)")
        if m.n_kv_heads not in (0, m.n_heads):
            problems.append(f"{key}.n_kv_heads={m.n_kv_heads} (grouped-query attention) but CLIP has one key/value "
                            "head per query head")
        if getattr(m, "embedding_dim", 0) not in (0, m.dim):
            problems.append(f"{key}.embedding_dim={m.embedding_dim} but CLIP's embeddings are as wide as the blocks")
        if m.activation not in _ACT_EXACT:
            problems.append(f"{key}.activation={m.activation!r} has no transformers twin")
    if c.image_pool != "cls":
        problems.append(f"clip.image_pool={c.image_pool!r} but CLIPVisionModel pools the class token (cls)")
    return problems


def _state_with_biases(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state dict with a zero bias for every Linear and LayerNorm built without one."""
    s = _state(module)
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, nn.Linear) and m.bias is None:
            s[f"{prefix}bias"] = torch.zeros(m.out_features)
        elif isinstance(m, nn.LayerNorm) and m.bias is None:
            s[f"{prefix}bias"] = torch.zeros(m.normalized_shape)
    return s


def clip_state_dict(objective: nn.Module) -> dict[str, torch.Tensor]:
    """An ``lmssl.objectives.clip.CLIP`` -> ``CLIPModel`` names.

    Vision: the patch embedding's ``(dim, p * p * C)`` weight becomes the bias-free convolution;
    its bias (constant over patches) is added to the sin-cos rows of the position table, whose
    class-token row is zero (the class token has no position in lmssl); ``embed_norm`` is
    ``pre_layrnorm``, the core's final norm ``post_layernorm`` (lmssl norms every token, CLIP
    only the pooled class token: the same vector). Text: the first ``vocab_size`` embedding rows;
    the position table as it is (sin-cos written into it, zeros without positions); the core's
    final norm is ``final_layer_norm``. The logit scale is written clamped."""
    from lmssl.nn import sincos_positions

    vis, txt = objective.backbone, objective.text
    vm, tm = vis.cfg, txt.cfg
    sv, st = _state_with_biases(vis), _state_with_biases(txt)
    p, C = vis.vision.patch_size, vis.vision.channels
    table = torch.cat([torch.zeros(1, vm.dim), _position_table(vis) + sv["patches.bias"]])
    out = {"vision_model.embeddings.class_embedding": sv["cls"],
           "vision_model.embeddings.patch_embedding.weight":
               sv["patches.weight"].view(vm.dim, p, p, C).permute(0, 3, 1, 2).contiguous(),
           "vision_model.embeddings.position_embedding.weight": table,
           "vision_model.pre_layrnorm.weight": sv["embed_norm.weight"],
           "vision_model.pre_layrnorm.bias": sv["embed_norm.bias"],
           "vision_model.post_layernorm.weight": sv["core.norm.weight"],
           "vision_model.post_layernorm.bias": sv["core.norm.bias"]}
    out |= _blocks(sv, vm, "core.blocks.", "vision_model.encoder.layers.", _CLIP_LAYER)
    if tm.positions == "learned":
        positions = st["positions.weight"]
    elif tm.positions == "sincos":
        positions = sincos_positions(tm.max_positions, tm.dim)
    else:
        positions = torch.zeros(tm.max_positions, tm.dim)
    out |= {"text_model.embeddings.token_embedding.weight": st["tokens.weight"][: tm.vocab_size],
            "text_model.embeddings.position_embedding.weight": positions,
            "text_model.final_layer_norm.weight": st["core.norm.weight"],
            "text_model.final_layer_norm.bias": st["core.norm.bias"]}
    out |= _blocks(st, tm, "core.blocks.", "text_model.encoder.layers.", _CLIP_LAYER)
    out |= {"visual_projection.weight": objective.image_projection.weight.detach().float().cpu(),
            "text_projection.weight": objective.text_projection.weight.detach().float().cpu(),
            "logit_scale": objective.logit_scale().detach().float().cpu().log().reshape(())}  # () clamped
    return out


def clip_config(cfg: RunConfig, tokenizer, logit_scale: float):
    """``CLIPConfig`` of the two towers' shapes; the text config's ``eos_token_id`` is the
    end-of-text id the captions end with (what ``CLIPTextModel`` pools)."""
    import math

    from transformers import CLIPConfig

    from lmssl.data.pairs import text_specials
    from lmssl.models.transformer import mlp_hidden

    start, end, pad = text_specials(tokenizer)
    v, t, c = cfg.model, cfg.clip.text, cfg.clip
    text = dict(vocab_size=t.vocab_size, hidden_size=t.dim, intermediate_size=mlp_hidden(t),
                num_hidden_layers=t.n_layers, num_attention_heads=t.n_heads, max_position_embeddings=t.max_positions,
                hidden_act=_ACT_EXACT[t.activation],
                layer_norm_eps=t.norm_eps, attention_dropout=t.dropout, initializer_range=t.init_std,
                projection_dim=c.embed_dim, pad_token_id=pad, bos_token_id=start if start is not None else end,
                eos_token_id=end)
    vision = dict(hidden_size=v.dim, intermediate_size=mlp_hidden(v), num_hidden_layers=v.n_layers,
                  num_attention_heads=v.n_heads, num_channels=cfg.vision.channels, image_size=cfg.vision.image_size,
                  patch_size=cfg.vision.patch_size, hidden_act=_ACT_EXACT[v.activation], layer_norm_eps=v.norm_eps,
                  attention_dropout=v.dropout, initializer_range=v.init_std, projection_dim=c.embed_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=c.embed_dim,
                      logit_scale_init_value=math.log(logit_scale), architectures=["CLIPModel"])


def clip_processor(cfg: RunConfig, tokenizer):
    """``CLIPProcessor``: a copy of the run's tokenizer whose post-processor adds the start
    (when the tokenizer has one distinct from its end) and end-of-text tokens and which cuts
    captions to ``data.block_size`` tokens, padding on the right, so that ``processor(text=...)``
    gives the ids the run trained on; and a ``CLIPImageProcessor`` that converts to RGB, resizes
    the shorter side to ``vision.image_size`` (bicubic), takes the centred square, scales to
    [0, 1] and normalises with the run's mean and std, as lmssl's evaluation does."""
    import copy

    from tokenizers import processors
    from transformers import CLIPProcessor

    from lmssl.data.pairs import text_specials
    from lmssl.export.core import quiet_transformers

    start, end, pad = text_specials(tokenizer)
    tok = copy.deepcopy(tokenizer)
    names = {i: tok.convert_ids_to_tokens(i) for i in (start, end) if i is not None}
    single = " ".join(([names[start]] if start is not None else []) + ["$A", names[end]])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(name, i) for i, name in names.items()])
    tok.model_max_length = cfg.data.block_size
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        tok.pad_token = names[end]
    v = cfg.vision
    with quiet_transformers():  # "torchvision not installed: the PIL backend is used" is fine here
        from transformers import CLIPImageProcessor

        images = CLIPImageProcessor(do_resize=True, size={"shortest_edge": v.image_size}, resample=3,
                                    do_center_crop=True, crop_size={"height": v.image_size, "width": v.image_size},
                                    do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                    image_mean=list(v.mean), image_std=list(v.std), do_convert_rgb=v.channels == 3)
    return CLIPProcessor(image_processor=images, tokenizer=tok)


def save_clip_processor(cfg: RunConfig, tokenizer, folder) -> None:
    """Write :func:`clip_processor` into ``folder`` (replacing the plain tokenizer files there)."""
    from lmssl.data.tokenizer import _save
    from lmssl.export.core import quiet_transformers

    processor = clip_processor(cfg, tokenizer)
    with quiet_transformers():
        processor.save_pretrained(str(folder))
    _save(processor.tokenizer, Path(folder))  # the tokenizer_config both transformers 4 and 5 load


def _random_pictures(cfg: RunConfig, n: int = 3) -> torch.Tensor:
    """``(n, C, S, S)`` uint8 pictures with structure (colour blocks and noise) at the training size."""
    v = cfg.vision
    g = torch.Generator().manual_seed(4321)
    blocks = torch.randint(0, 256, (n, v.channels, 4, 4), generator=g, dtype=torch.uint8)
    big = blocks.repeat_interleave(v.image_size // 4 + 1, 2).repeat_interleave(v.image_size // 4 + 1, 3)
    noise = torch.randint(-20, 21, (n, v.channels, v.image_size, v.image_size), generator=g)
    return (big[..., : v.image_size, : v.image_size].int() + noise).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def check_clip(objective: nn.Module, cfg: RunConfig, folder) -> dict[str, float]:
    """Reload ``folder`` with ``AutoModel`` (``CLIPModel``) and ``AutoProcessor`` and compare,
    in float32: the processor's ids with lmssl's for a few captions (count of differing ids),
    its pixels with lmssl's for pictures at the training size, and the image embeddings, the
    text embeddings (right- and left-padded) and ``logits_per_image`` of both models."""
    import numpy as np
    import transformers
    from PIL import Image

    from lmssl.data.pairs import encode_captions, text_specials

    tokenizer = objective.tokenizer
    model = transformers.AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(str(folder))
    texts = [objective.clip.template.format("red heart"), "grinning face, grin", "a",
             "word " * (2 * cfg.data.block_size)]  # the last one is cut to the caption length
    ids, mask = encode_captions(tokenizer, texts, cfg.data.block_size)
    theirs = processor(text=texts, padding=True, truncation=True, return_tensors="pt")
    checks = {"caption ids (CLIPProcessor vs lmssl; ids that differ)":
              float((theirs["input_ids"] != ids).sum()) if theirs["input_ids"].shape == ids.shape else float("inf")}
    pictures = _random_pictures(cfg)  # (n, C, S, S) uint8
    pixels = objective.plain_images({"images": pictures})  # (n, C, S, S) normalised
    v = cfg.vision
    if v.load_size in (0, v.image_size):  # lmssl decodes at the training size: one resize, as the processor does
        pil = [Image.fromarray(np.ascontiguousarray(p.permute(1, 2, 0).numpy().squeeze())) for p in pictures]
        theirs = processor(images=pil, return_tensors="pt")["pixel_values"]
        checks["pixel values (CLIPImageProcessor)"] = float((theirs - pixels).abs().max())
    image = objective.image_projection(objective.encode_image(pixels))
    checks["image embeds (get_image_features)"] = float((model.get_image_features(pixel_values=pixels).pooler_output
                                                        - image).abs().max())
    text = objective.text_projection(objective.encode_text(ids, mask))
    checks["text embeds (get_text_features)"] = float((model.get_text_features(input_ids=ids, attention_mask=mask)
                                                       .pooler_output - text).abs().max())
    # left padding: the rows shifted right, padding in front; both models pool the end-of-text token
    _, _, pad = text_specials(tokenizer)
    lengths = mask.sum(dim=1)
    left_ids, left_mask = torch.full_like(ids, pad), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, ids.shape[1] - n:], left_mask[i, ids.shape[1] - n:] = ids[i, :n], 1
    ours_left = objective.text_projection(objective.encode_text(left_ids, left_mask))
    checks["text embeds, left padding (get_text_features)"] = float(
        (model.get_text_features(input_ids=left_ids, attention_mask=left_mask).pooler_output - ours_left).abs().max())
    n = min(len(pixels), len(texts))
    img_n, txt_n = nn.functional.normalize(image[:n], dim=-1), nn.functional.normalize(text[:n], dim=-1)
    ours = objective.logit_scale() * img_n @ txt_n.T
    out = model(input_ids=ids[:n], attention_mask=mask[:n], pixel_values=pixels[:n])
    checks["logits_per_image (CLIPModel)"] = float((out.logits_per_image - ours).abs().max())
    return checks


CLIP_USAGE = """from PIL import Image
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("{name}")  # CLIPModel
processor = AutoProcessor.from_pretrained("{name}")  # CLIPProcessor: the tokenizer and the image processor
labels = ["red heart", "grinning face", "cat face"]
inputs = processor(text=[{template!r}.format(label) for label in labels], images=Image.open("emoji.png"),
                   return_tensors="pt", padding=True)
probs = model(**inputs).logits_per_image.softmax(dim=1)  # (1, 3): the image against each label"""


def zero_shot_table(objective: nn.Module, cfg: RunConfig) -> str:
    """Markdown: the exported weights' zero-shot accuracy and recall@1/5 on the run's held-out
    pairs ("" when the pairs cannot be read here, e.g. a Hub dataset offline)."""
    from types import SimpleNamespace

    from lmssl.data.pairs import describe_pairs, held_out_pairs

    try:
        held = held_out_pairs(cfg, objective.tokenizer, cfg.monitor.query_images)
    except Exception:  # data that is not here: the card goes without the table
        return ""
    m = objective.eval_metrics({}, SimpleNamespace(held_out=held), lambda msg: None)
    if not m:
        return ""
    lines = ["## Zero-shot classification and retrieval", "",
             f"On {len(held.images)} held-out pairs of {describe_pairs(cfg)}, never trained on:", "",
             "| task | metric | this model | chance |", "|---|---|---|---|"]
    if "zero_shot_accuracy" in m:
        k = len(held.classes)
        lines += [f"| zero-shot classification among {k} classes, prompt `{objective.clip.template}` | top-1 | "
                  f"{m['zero_shot_accuracy']:.1%} | {1 / k:.1%} |",
                  f"| | top-5 | {m['zero_shot_top5']:.1%} | {min(1.0, 5 / k):.1%} |"]
    n = len(held.images)
    lines += [f"| image -> caption retrieval among {n} | recall@1 | {m['i2t_r1']:.1%} | {1 / n:.1%} |",
              f"| | recall@5 | {m['i2t_r5']:.1%} | {min(1.0, 5 / n):.1%} |",
              f"| caption -> image retrieval among {n} | recall@1 | {m['t2i_r1']:.1%} | {1 / n:.1%} |",
              f"| | recall@5 | {m['t2i_r5']:.1%} | {min(1.0, 5 / n):.1%} |", ""]
    return "\n".join(lines)


@register("clip", "vit", head=False)
def clip_model(objective: nn.Module, cfg: RunConfig, tokenizer) -> Converted:
    """Both towers, the projections and the logit scale as ``CLIPModel`` (``AutoModel``), with a
    ``CLIPProcessor`` (``AutoProcessor``) that tokenizes and preprocesses as the run did."""
    import transformers

    from lmssl.data.pairs import text_specials

    _, end, pad = text_specials(tokenizer)
    if end == 2:
        raise NoExactTwin("the tokenizer's end-of-text id is 2, which CLIPTextModel reads as its legacy rule (pool "
                          "the largest id of each row), not the end-of-text token; use a tokenizer whose eos id is "
                          "not 2")
    notes = ["`CLIPModel.logit_scale` holds the clamped scale the run used",
             "the image processor resizes the shorter side to the training size (bicubic) and takes the centred "
             "square, as lmssl's evaluation does",
             f"captions end with the end-of-text token (id {end}), which the processor's tokenizer appends and "
             "`CLIPTextModel` pools (`text_config.eos_token_id`); "
             + ("pad on the right (the padding id is the end-of-text id)" if pad == end else
                "padding may be on either side")]
    usage = CLIP_USAGE.replace("{template!r}", repr(objective.clip.template))
    with torch.no_grad():
        scale = float(objective.logit_scale())
    return Converted(transformers.CLIPModel, clip_config(cfg, tokenizer, scale),
                     clip_state_dict(objective), "clip", "zero-shot-image-classification", notes,
                     check=check_clip, usage=usage, write=lambda folder: save_clip_processor(cfg, tokenizer, folder),
                     card=zero_shot_table(objective, cfg))


clip_model.config_problems = clip_config_problems
