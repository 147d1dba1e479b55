"""``lmssl bench``: lmssl's training throughput against the ``transformers`` model of the same shape.

Both models live in one process and get the same shape and parameter count, the same
AdamW settings (:func:`lmssl.train.optim.make_optimizer`), the same batch, the same
precision and SDPA attention (causal through ``is_causal`` for decoders). After warm-up,
full training steps (forward, backward, optimizer step, ``zero_grad``) are timed in
rounds that alternate which side goes first (lmssl, reference | reference, lmssl | ...),
so load from other processes on a shared machine falls on both sides alike. The figure
that matters is the per-round throughput ratio lmssl / reference: its median, min and max.

Reported per side: tokens/s, achieved TFLOP/s and MFU (both sides use the lmssl
objective's FLOPs per token, so their ratio is the throughput ratio), peak memory, and
the warm-up time (which includes compilation with ``--compile``). Also the data path:
fast-tokenizer throughput on the bundled corpus and the packing + collation time per
batch, each as a fraction of one lmssl training step.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the warm-up steps, minus
what was allocated before the model was built. On a CPU the same quantity, exactly: the
bytes of the weights, buffers and optimizer state, plus the highest point that one more
(untimed) step's tensor allocations minus frees reach, from the profiler's allocation
events (:func:`cpu_step_peak`). Elsewhere it is reported as n/a.

For ``mae`` a third contender runs in the same rounds: lmssl's MAE with an encoder that
sees every patch (hidden ones as a mask token), the "full-sequence encoder" that MAE's
visible-only encoder is measured against.

Usage::

    lmssl bench gpt --size tiny                       # CPU defaults: batch 8 x 256 tokens
    lmssl bench mae --size tiny                       # 64 images of 32 x 32, 4 x 4 patches
    lmssl bench llama --size small --device cuda --precision bf16 --json llama.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lmssl.errors import UserError

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], torch.Tensor]


# ----------------------------------------------------------------------------- what is compared


@dataclass(frozen=True)
class Size:
    """One benchmark size of a family: an lmssl preset and the workload run on it."""

    preset: str  # lmssl model preset (lmssl.models.presets)
    vocab: int  # vocabulary size given to both models (0 for images)
    seq_len: int  # default tokens per sequence (images: patches per image, set by `overrides`)
    batch_cpu: int  # default sequences (or images) per step on a CPU
    batch_cuda: int  # default sequences (or images) per step on a GPU
    overrides: tuple[str, ...] = ()  # further config overrides, e.g. image geometry and decoder size


@dataclass(frozen=True)
class Family:
    """A model family: its sizes, how each side is built, and what one batch is."""

    sizes: dict[str, Size]
    build_lmssl: Callable[[Any], tuple[nn.Module, LossFn]]  # RunConfig -> (module, loss of a batch)
    build_reference: Callable[[Any], tuple[nn.Module, LossFn]]  # RunConfig -> (transformers model, loss)
    make_batch: Callable[[Any, int, torch.Generator], Batch]  # (RunConfig, batch size, generator) -> CPU batch
    unit: str = "tokens"  # what throughput counts: tokens or images
    # a second lmssl-built contender timed in the same rounds: (name, RunConfig -> (module, loss))
    baseline: tuple[str, Callable[[Any], tuple[nn.Module, LossFn]]] | None = None


def _gpt_sizes() -> dict[str, Size]:
    # tiny: the shipped tokenizer's 8192 tokens; small: GPT-2's own 50257 (not a multiple of 64)
    small = Size("gpt2", 50257, 1024, 1, 16)
    return {"tiny": Size("gpt_tiny", 8192, 256, 8, 64), "small": small, "base": small}


def _llama_sizes() -> dict[str, Size]:
    small = Size("llama_small", 32000, 1024, 1, 16)  # Llama-2's 32000-token vocabulary
    return {"tiny": Size("llama_tiny", 8192, 256, 8, 64), "small": small, "base": small}


def _bert_sizes() -> dict[str, Size]:
    base = Size("bert_base", 30522, 512, 2, 32)  # bert-base-uncased's 30522-token vocabulary
    return {"tiny": Size("bert_tiny", 8192, 256, 8, 64), "small": base, "base": base}


def _modernbert_sizes() -> dict[str, Size]:
    # masked at ModernBERT's 30% rate (mlm_tiny's); base: answerdotai/ModernBERT-base's shape and 50368-token vocabulary
    tiny = Size("modernbert_tiny", 8192, 256, 8, 64, ("mlm.mask_rate=0.3",))
    base = Size("modernbert_base", 50368, 512, 2, 32, ("mlm.mask_rate=0.3",))
    return {"tiny": tiny, "small": base, "base": base}


def _electra_sizes() -> dict[str, Size]:
    # tiny: electra_tiny's shape (bert_tiny, 128-wide embeddings, a 1/4-wide generator); base: ELECTRA-Base's
    # (768 wide, 1/3-wide generator, the 30522-token vocabulary)
    tiny = Size("bert_tiny", 8192, 128, 16, 64, ("objective=electra", "model.family=electra", "model.embedding_dim=128"))
    base = Size("bert_base", 30522, 512, 2, 32, ("objective=electra", "model.family=electra",
                                                 "electra.generator_size=0.3333333"))
    return {"tiny": tiny, "small": base, "base": base}


def _clip_sizes() -> dict[str, Size]:
    # tiny: clip_tiny's towers (a 4 x 128 ViT on 32 x 32 RGB images in 8 x 8 patches; a 4 x 128 causal text tower
    # on 32-token captions); base: CLIP ViT-B/16's (a ViT-B/16 on 224 x 224; a 12 x 512 text tower, 77 tokens)
    tower = ("objective=clip", "model.embedding_norm=true", "vision.channels=3", "monitor.online_probe=false")
    tiny = Size("vit_tiny", 0, 16, 64, 256, tower + (
        "model.dim=128", "model.n_heads=4", "vision.image_size=32", "vision.patch_size=8", "clip.text.preset=gpt_tiny",
        "clip.text.dim=128", "clip.text.n_layers=4", "clip.text.n_heads=4", "clip.text.max_positions=32",
        "clip.embed_dim=128", "data.block_size=32"))
    base = Size("vit_base", 0, 196, 8, 128, tower + (
        "vision.image_size=224", "vision.patch_size=16", "clip.text.preset=gpt_tiny", "clip.text.dim=512",
        "clip.text.n_layers=12", "clip.text.n_heads=8", "clip.text.max_positions=77", "clip.embed_dim=512",
        "data.block_size=77"))
    return {"tiny": tiny, "small": base, "base": base}


# --- lmssl side


def _lmssl_causal(cfg) -> tuple[nn.Module, LossFn]:
    from lmssl.objectives.causal_lm import CausalLM

    model = CausalLM(cfg.model)
    return model, model


def _mae_sizes() -> dict[str, Size]:
    # tiny: CIFAR-sized 32 x 32 images in 4 x 4 patches (64 per image), a 128-wide 2-block decoder;
    # base: ViT-B/16 on 224 x 224 images with the MAE paper's 512-wide 8-block decoder
    tiny = Size("vit_tiny", 0, 64, 64, 512, ("vision.image_size=32", "vision.patch_size=4", "mae.decoder_dim=128",
                                             "mae.decoder_layers=2", "mae.decoder_heads=4"))
    base = Size("vit_base", 0, 196, 8, 128, ("vision.image_size=224", "vision.patch_size=16"))
    return {"tiny": tiny, "small": base, "base": base}


def _lmssl_mae(cfg) -> tuple[nn.Module, LossFn]:
    from lmssl.objectives.mae import MAE

    model = MAE.build(cfg)
    return model, lambda b: model.loss_on(b["pixel_values"])[0]


def _lmssl_mae_full_encoder(cfg) -> tuple[nn.Module, LossFn]:
    """The same MAE with an encoder that runs on every patch (hidden ones as a mask token)."""
    from dataclasses import replace

    from lmssl.objectives.mae import MAE

    cfg.sections["mae"] = replace(cfg.mae, encoder_mask_token=True)
    model = MAE.build(cfg)
    return model, lambda b: model.loss_on(b["pixel_values"])[0]


def _simclr_sizes() -> dict[str, Size]:
    # tiny: vit_tiny (4 x 256, as mae_tiny; simclr_tiny trains 4 x 128) on 32 x 32 RGB views; base: ViT-B/16 on 224 x 224
    tiny = Size("vit_tiny", 0, 64, 64, 512, ("vision.image_size=32", "vision.patch_size=4", "monitor.online_probe=false"))
    base = Size("vit_base", 0, 196, 8, 128, ("vision.image_size=224", "vision.patch_size=16",
                                             "simclr.proj_hidden=2048", "monitor.online_probe=false"))
    return {"tiny": tiny, "small": base, "base": base}


def _lmssl_simclr(cfg) -> tuple[nn.Module, LossFn]:
    """SimCLR's step on two given views: backbone, projector, NT-Xent (the views' augmentation
    is left out on both sides; ``measure_image_data_path`` times the CPU side of it)."""
    from lmssl.objectives.simclr import SimCLR

    model = SimCLR(cfg)
    return model, lambda b: model.loss_on(b["view1"], b["view2"])[0]


class ViTModelWithProjector(nn.Module):
    """The reference side of ``lmssl bench simclr`` (named in the results table)."""

    def __init__(self, vit: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.vit, self.projector = vit, projector


def _reference_simclr(cfg) -> tuple[nn.Module, LossFn]:
    """``transformers.ViTModel`` of the same shape, the same projector, and NT-Xent written
    out plainly: normalise, all-pairs similarity, the diagonal masked, cross-entropy."""
    import torch.nn.functional as F
    from transformers import ViTModel

    from lmssl.export.transformers_map import vit_config

    c = cfg.simclr
    config = vit_config(cfg.model, cfg.vision)
    config._attn_implementation = "sdpa"
    vit = ViTModel(config, add_pooling_layer=False)
    projector = nn.Sequential(nn.Linear(cfg.model.dim, c.proj_hidden, bias=False), nn.BatchNorm1d(c.proj_hidden),
                              nn.ReLU(inplace=True), nn.Linear(c.proj_hidden, c.proj_dim))
    model = ViTModelWithProjector(vit, projector)

    def loss(b: Batch) -> torch.Tensor:
        z = [projector(vit(pixel_values=b[k]).last_hidden_state[:, 0]) for k in ("view1", "view2")]
        z = F.normalize(torch.cat(z), dim=1)  # (2B, proj_dim)
        n = z.shape[0] // 2
        sim = (z @ z.t() / c.temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        return F.cross_entropy(sim, targets)

    return model, loss


def _lmssl_electra(cfg) -> tuple[nn.Module, LossFn]:
    """lmssl's ELECTRA step on a prepared batch: the generator at the masked positions only,
    replacements sampled from it, the discriminator on every token."""
    model = _electra_objective(cfg)
    return model, model


def _electra_objective(cfg) -> nn.Module:
    from lmssl.data.tokenizer import load_tokenizer
    from lmssl.objectives.electra import Electra
    from lmssl.objectives.mlm import MaskingSpec

    return Electra(cfg.model, cfg.electra, MaskingSpec.from_tokenizer(load_tokenizer("default"), "token"),
                   cfg.data.block_size)


class ElectraGeneratorAndDiscriminator(nn.Module):
    """The reference side of ``lmssl bench electra`` (named in the results table):
    ``ElectraForMaskedLM`` and ``ElectraForPreTraining`` sharing one ``ElectraEmbeddings``."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module) -> None:
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        generator.electra.embeddings = discriminator.electra.embeddings
        generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight


def _reference_electra(cfg) -> tuple[nn.Module, LossFn]:
    """The same two networks built from ``transformers``' ELECTRA classes, and ELECTRA's step
    written plainly: the masked LM's logits at every position, a softmax sample at the masked
    ones, the discriminator's binary cross-entropy at every token, MLM + disc_weight x BCE."""
    import torch.nn.functional as F
    from transformers import ElectraForMaskedLM, ElectraForPreTraining

    from lmssl.data.tokenizer import load_tokenizer
    from lmssl.export.transformers_map import electra_config
    from lmssl.objectives.electra import generator_config

    tokenizer = load_tokenizer("default")
    configs = [electra_config(m, tokenizer, a) for m, a in ((generator_config(cfg.model, cfg.electra), "ElectraForMaskedLM"),
                                                             (cfg.model, "ElectraForPreTraining"))]
    for c in configs:
        c._attn_implementation = "sdpa"
    model = ElectraGeneratorAndDiscriminator(ElectraForMaskedLM(configs[0]), ElectraForPreTraining(configs[1]))
    weight = cfg.electra.disc_weight

    def loss(b: Batch) -> torch.Tensor:
        logits = model.generator(input_ids=b["input_ids"]).logits  # (B, T, V)
        labels = b["labels"]
        mlm = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        with torch.no_grad():
            chosen = labels != -100
            sampled = torch.multinomial(logits[chosen].float().softmax(-1), 1).squeeze(1)
            corrupted = b["original_ids"].clone()
            corrupted[chosen] = sampled
        d_logits = model.discriminator(input_ids=corrupted).logits  # (B, T)
        bce = F.binary_cross_entropy_with_logits(d_logits.float(), (corrupted != b["original_ids"]).float())
        return mlm + weight * bce

    return model, loss


def _electra_batch(cfg, batch_size: int, g: torch.Generator) -> Batch:
    """Random token ids, masked as ELECTRA's ``prepare_batch`` does (15%; 85% of them shown as
    the mask token, the rest unchanged), with the originals and the sampling numbers."""
    ids = _causal_batch(cfg, batch_size, g)["input_ids"]
    return _electra_objective(cfg).prepare_batch({"input_ids": ids}, g)


def _lmssl_clip(cfg) -> tuple[nn.Module, LossFn]:
    """lmssl's CLIP step on given images and captions: both towers, the projections, the
    learned temperature, the symmetric InfoNCE (the crop view is left out on both sides)."""
    from lmssl.data.tokenizer import load_tokenizer
    from lmssl.objectives.clip import CLIP, clip_loss

    model = CLIP.build(cfg, load_tokenizer(cfg.data.tokenizer))

    def loss(b: Batch) -> torch.Tensor:
        img = model.image_embeds(b["pixel_values"])
        txt = model.text_embeds(b["input_ids"], b["attention_mask"])
        return clip_loss(img, txt, model.temperature(), gather=False)[0]

    return model, loss


def _reference_clip(cfg) -> tuple[nn.Module, LossFn]:
    """``transformers.CLIPModel`` of the same towers (the export's config), SDPA, its own loss
    (``return_loss=True``)."""
    from transformers import CLIPModel

    from lmssl.data.tokenizer import load_tokenizer
    from lmssl.export.transformers_map import clip_config

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg.clip.text.vocab_size = len(tokenizer)
    config = clip_config(cfg, tokenizer, 1.0 / cfg.clip.init_temperature)
    config._attn_implementation = "sdpa"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "sdpa"
    model = CLIPModel(config)
    return model, lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                  pixel_values=b["pixel_values"], return_loss=True).loss


def _caption_batch(cfg, batch_size: int, g: torch.Generator) -> Batch:
    """Random images and full-length captions of random ordinary tokens ending in the
    end-of-text token (what both towers pool)."""
    from lmssl.data.pairs import text_specials
    from lmssl.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    end = text_specials(tokenizer)[1]
    v, T = cfg.vision, cfg.data.block_size
    ids = torch.randint(len(SPECIAL_IDS), len(tokenizer), (batch_size, T), generator=g)
    ids[:, -1] = end
    return {"pixel_values": torch.randn(batch_size, v.channels, v.image_size, v.image_size, generator=g),
            "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _view_pair_batch(cfg, batch_size: int, g: torch.Generator) -> Batch:
    v = cfg.vision
    shape = (batch_size, v.channels, v.image_size, v.image_size)
    return {"view1": torch.randn(*shape, generator=g), "view2": torch.randn(*shape, generator=g)}


def _lmssl_masked(cfg) -> tuple[nn.Module, LossFn]:
    try:
        from lmssl.objectives.mlm import MaskedLM
    except ImportError:
        raise UserError("bert: lmssl's masked-LM objective (lmssl.objectives.mlm) is not available yet; "
                        "benchmark gpt or llama for now") from None
    from lmssl.data.tokenizer import load_tokenizer
    from lmssl.objectives.mlm import MaskingSpec

    # the shipped tokenizer's masking facts, so that prepare_batch can run in the data-path timing;
    # the timed batches are masked up front (see _masked_batch) and carry labels
    spec = MaskingSpec.from_tokenizer(load_tokenizer("default"), cfg.mlm.masking)
    model = MaskedLM(cfg.model, cfg.mlm, spec)
    return model, model


# --- transformers side


def _reference_gpt2(cfg) -> tuple[nn.Module, LossFn]:
    from transformers import AutoModelForCausalLM, GPT2Config

    from lmssl.models.transformer import mlp_hidden

    m = cfg.model
    config = GPT2Config(vocab_size=m.vocab_size, n_positions=m.max_positions, n_embd=m.dim, n_layer=m.n_layers,
                        n_head=m.n_heads, n_inner=mlp_hidden(m), activation_function="gelu_new",
                        resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
                        layer_norm_epsilon=m.norm_eps, initializer_range=m.init_std,
                        tie_word_embeddings=m.tie_embeddings, use_cache=False, bos_token_id=None,
                        eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model, lambda b: model(input_ids=b["input_ids"], labels=b["input_ids"]).loss


def _reference_llama(cfg) -> tuple[nn.Module, LossFn]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmssl.models.transformer import mlp_hidden

    m = cfg.model
    config = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=mlp_hidden(m),
                         num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                         num_key_value_heads=m.n_kv_heads or m.n_heads, hidden_act="silu",
                         max_position_embeddings=m.max_positions, rms_norm_eps=m.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                         attention_bias=m.bias, mlp_bias=m.bias, attention_dropout=m.dropout,
                         initializer_range=m.init_std, tie_word_embeddings=m.tie_embeddings, use_cache=False,
                         bos_token_id=None, eos_token_id=None)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model, lambda b: model(input_ids=b["input_ids"], labels=b["input_ids"]).loss


def _reference_bert(cfg) -> tuple[nn.Module, LossFn]:
    from transformers import AutoModelForMaskedLM, BertConfig

    from lmssl.models.transformer import mlp_hidden

    m = cfg.model
    config = BertConfig(vocab_size=m.vocab_size, hidden_size=m.dim, num_hidden_layers=m.n_layers,
                        num_attention_heads=m.n_heads, intermediate_size=mlp_hidden(m), hidden_act="gelu",
                        hidden_dropout_prob=m.dropout, attention_probs_dropout_prob=m.dropout,
                        max_position_embeddings=m.max_positions, type_vocab_size=m.type_vocab_size,
                        layer_norm_eps=m.norm_eps, initializer_range=m.init_std,
                        tie_word_embeddings=m.tie_embeddings)
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    return model, lambda b: model(input_ids=b["input_ids"], labels=b["labels"]).loss


def _reference_modernbert(cfg) -> tuple[nn.Module, LossFn]:
    from transformers import AutoModelForMaskedLM

    from lmssl.data.tokenizer import load_tokenizer
    from lmssl.export.transformers_map import modernbert_config

    # the export's config, so the reference is the class an lmssl run exports to (special ids: the shipped tokenizer's)
    config = modernbert_config(cfg.model, load_tokenizer("default"), "ModernBertForMaskedLM")
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    return model, lambda b: model(input_ids=b["input_ids"], labels=b["labels"]).loss


def _reference_mae(cfg) -> tuple[nn.Module, LossFn]:
    from transformers import AutoModelForPreTraining

    from lmssl.export.transformers_map import vit_mae_config

    model = AutoModelForPreTraining.from_config(vit_mae_config(cfg.model, cfg.vision, cfg.mae), attn_implementation="sdpa")
    return model, lambda b: model(pixel_values=b["pixel_values"]).loss


# --- batches (tokenizer-free: random ids; the data path is timed separately)


MEMORY_SOURCES = {
    "cuda": "torch.cuda.max_memory_allocated over building and warming up",
    "cpu": "tensor bytes: weights, optimizer state and one step's peak (profiler allocation events)",
}
MASK_ID = 3  # the shipped tokenizer's <mask>; ids 0..5 are its special tokens
SPECIAL_IDS = tuple(range(6))


def _causal_batch(cfg, batch_size: int, g: torch.Generator) -> Batch:
    ids = torch.randint(len(SPECIAL_IDS), cfg.model.vocab_size, (batch_size, cfg.data.block_size), generator=g)
    return {"input_ids": ids}


def _masked_batch(cfg, batch_size: int, g: torch.Generator) -> Batch:
    """``mlm.mask_rate`` of the positions chosen (bert: 15%, modernbert: 30%), BERT's 80/10/10
    corruption, labels -100 elsewhere."""
    from lmssl.masking import bernoulli_token_mask, mlm_corrupt

    ids = _causal_batch(cfg, batch_size, g)["input_ids"]
    chosen = bernoulli_token_mask(ids, cfg.mlm.mask_rate, g, SPECIAL_IDS)
    corrupted, labels = mlm_corrupt(ids, chosen, g, mask_token_id=MASK_ID, vocab_size=cfg.model.vocab_size,
                                    special_ids=SPECIAL_IDS)
    return {"input_ids": corrupted, "labels": labels}


def _image_batch(cfg, batch_size: int, g: torch.Generator) -> Batch:
    v = cfg.vision
    return {"pixel_values": torch.randn(batch_size, v.channels, v.image_size, v.image_size, generator=g)}


FAMILIES: dict[str, Family] = {
    "gpt": Family(_gpt_sizes(), _lmssl_causal, _reference_gpt2, _causal_batch),
    "llama": Family(_llama_sizes(), _lmssl_causal, _reference_llama, _causal_batch),
    "bert": Family(_bert_sizes(), _lmssl_masked, _reference_bert, _masked_batch),
    "modernbert": Family(_modernbert_sizes(), _lmssl_masked, _reference_modernbert, _masked_batch),
    "mae": Family(_mae_sizes(), _lmssl_mae, _reference_mae, _image_batch, unit="images",
                  baseline=("full-sequence encoder", _lmssl_mae_full_encoder)),
    "simclr": Family(_simclr_sizes(), _lmssl_simclr, _reference_simclr, _view_pair_batch, unit="images"),
    "electra": Family(_electra_sizes(), _lmssl_electra, _reference_electra, _electra_batch),
    "clip": Family(_clip_sizes(), _lmssl_clip, _reference_clip, _caption_batch, unit="images"),
}


# ----------------------------------------------------------------------------- measuring


@dataclass
class Side:
    """One contender: a model, its loss on a batch, its optimizer and what was measured."""

    name: str
    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    params: int
    round_s: list[float] = field(default_factory=list)  # wall-clock seconds per timed round
    round_cpu_s: list[float] = field(default_factory=list)  # process CPU seconds per timed round (all threads)
    round_faults: list[int] = field(default_factory=list)  # minor page faults of the process per timed round
    warmup_s: float = 0.0
    peak_mem: int | None = None
    attention: str = ""
    final_loss: float = float("nan")


def train_step(side: Side, batch: Batch, autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """One full optimizer step: forward, backward, AdamW step, ``zero_grad(set_to_none=True)``."""
    with autocast():
        loss = side.loss_fn(batch)
    loss.backward()
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(side: Side, batch: Batch, steps: int, device: torch.device, autocast) -> tuple[float, float, int]:
    """``(wall seconds, process CPU seconds, minor page faults)`` of ``steps`` training steps,
    the device drained before and after."""
    _sync(device)
    faults, cpu, t = _minor_faults(), time.process_time(), time.perf_counter()
    for _ in range(steps):
        loss = train_step(side, batch, autocast)
    _sync(device)
    elapsed, cpu, faults = time.perf_counter() - t, time.process_time() - cpu, _minor_faults() - faults
    side.final_loss = float(loss)
    return elapsed, cpu, faults


def _minor_faults() -> int:
    """Minor page faults of this process so far: each is a page of freshly mapped memory
    touched for the first time (0 where ``resource`` is missing, as on Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class MemoryProbe:
    """CUDA: the allocator's peak inside ``with probe:``, over what was allocated before.
    Other devices: ``bytes`` stays None (see :func:`cpu_step_peak`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bytes: int | None = None
        self._base = 0

    def __enter__(self) -> "MemoryProbe":
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base


def _held_bytes(side: Side) -> int:
    """Bytes of the tensors a side keeps between steps: weights, buffers, optimizer state
    (each storage once, so tied weights count once)."""
    tensors = [*side.model.parameters(), *side.model.buffers()]
    tensors += [v for state in side.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def cpu_step_peak(side: Side, batch: Batch, autocast) -> int | None:
    """Exact peak of tensor memory of one training step on a CPU, as CUDA's
    ``max_memory_allocated`` counts it: what the side holds between steps (weights,
    buffers, AdamW state) plus the highest point of the step's allocations minus frees,
    read from the profiler's allocation events (gradients, activations, temporaries). None
    where this torch's profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    held = _held_bytes(side)
    gc.disable()  # a collection inside the step would free tensors from before it and lower the count
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(side, batch, autocast)
    finally:
        gc.enable()
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    level = top = 0
    for _, nbytes in sorted(events, key=lambda e: (e[0], e[1] < 0)):  # at equal times, allocations first
        level += nbytes
        top = max(top, level)
    return held + top


@contextlib.contextmanager
def record_sdpa(calls: list[dict]):
    """Record the arguments of every ``scaled_dot_product_attention`` call inside the block."""
    fn = torch.nn.functional.scaled_dot_product_attention

    def wrapper(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        calls.append({"is_causal": bool(is_causal), "mask": attn_mask is not None, "gqa": bool(kw.get("enable_gqa")),
                      "dtype": str(q.dtype).replace("torch.", "")})
        return fn(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    torch.nn.functional.scaled_dot_product_attention = wrapper
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = fn


def describe_attention(side: Side, batch: Batch, autocast) -> str:
    """How the side's attention runs, e.g. ``SDPA x4 (is_causal, no mask)``; one forward pass."""
    calls: list[dict] = []
    with torch.no_grad(), autocast(), record_sdpa(calls):
        side.loss_fn(batch)
    if not calls:
        return "no SDPA call (eager attention)"
    kinds = sorted({(c["is_causal"], c["mask"], c["gqa"]) for c in calls})
    parts = [("is_causal" if causal else "bidirectional") + (", mask" if mask else ", no mask") + (", gqa" if gqa else "")
             for causal, mask, gqa in kinds]
    return f"SDPA x{len(calls)} ({'; '.join(parts)})"


# ----------------------------------------------------------------------------- data path


def measure_data_path(cfg, batch_size: int, step_s: float, objective: nn.Module, batches: int = 50) -> dict[str, float]:
    """Tokenizer throughput on the bundled validation text and packing + collation time per
    batch (``PackedBlocks`` through ``micro_batch``, plus ``prepare_batch`` when the objective
    has one), each also as a fraction of one training step of ``step_s`` seconds."""
    import numpy as np

    from lmssl.data.batches import TextData, micro_batch
    from lmssl.data.text import BUNDLED, PackedBlocks, TokenFile, tokenize_batch
    from lmssl.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("default")
    lines = [ln for ln in Path(BUNDLED["validation"][0]).read_text(encoding="utf-8").splitlines() if ln.strip()]
    tokenize_batch(tokenizer, lines[:200], tokenizer.eos_token_id)  # warm-up
    t = time.perf_counter()
    rows: list[list[int]] = []
    n_bytes = 0
    for i in range(0, len(lines), 1000):  # the batch size tokenize_corpus uses
        ids, b, _ = tokenize_batch(tokenizer, lines[i:i + 1000], tokenizer.eos_token_id)
        rows += ids
        n_bytes += b
    tokenize_s = time.perf_counter() - t
    n_tokens = sum(len(r) for r in rows)
    tokens = np.concatenate([np.asarray(r, dtype=np.uint16) for r in rows])
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    tf = TokenFile(tokens, offsets, n_bytes, 0)

    T = cfg.data.block_size
    data = TextData(PackedBlocks(tf, T, packing=True, pad_id=tokenizer.pad_token_id), [], tf.bytes_per_token, n_tokens)
    prepare = getattr(objective, "prepare_batch", None)
    gen = torch.Generator().manual_seed(0)
    cursor = 0
    t = time.perf_counter()
    for _ in range(batches):
        batch, _ = micro_batch(data, cfg, cursor, 0, 0, 1)
        if prepare is not None:
            batch = prepare(batch, gen)
        cursor += batch_size
    collate_s = (time.perf_counter() - t) / batches
    tokens_per_step = batch_size * T
    tokenize_per_step = tokens_per_step * tokenize_s / n_tokens
    return {
        "tokenize_tokens_per_s": n_tokens / tokenize_s,
        "tokenize_mb_per_s": n_bytes / tokenize_s / 1e6,
        "collate_s_per_batch": collate_s,
        "collate_fraction": collate_s / step_s,
        "tokenize_fraction": tokenize_per_step / step_s,
        "includes_prepare_batch": prepare is not None,
    }


def measure_image_data_path(cfg, batch_size: int, step_s: float, objective: nn.Module, batches: int = 10) -> dict:
    """The CPU side of an image step, as in training: decoding PNG images through ``datasets``
    and :class:`lmssl.data.images.ImageSource` (resized to the model's size), drawing the
    views' parameters, and the objective's ``prepare_batch`` (the mask draw), per batch and
    as a fraction of a step. The images are random pixels at 1.25x the model's size, so
    every one is resized. (The views themselves are cut on the device, inside the step.)"""
    import io

    import datasets
    import numpy as np
    from PIL import Image

    from lmssl.data.images import ImageSource

    side = cfg.vision.image_size * 5 // 4
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(batch_size):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        pngs.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"image": pngs}).cast_column("image", datasets.Image(decode=False))
    samples = ImageSource(ds, cfg.vision, 0, shuffle=True, views=objective.views)
    gen = torch.Generator().manual_seed(0)
    samples.batch_at(0, batch_size)  # warm-up
    t = time.perf_counter()
    for i in range(batches):
        objective.prepare_batch(samples.batch_at(i * batch_size, batch_size), gen)
    per_batch = (time.perf_counter() - t) / batches
    return {"image_side": side, "collate_s_per_batch": per_batch, "collate_fraction": per_batch / step_s,
            "images_per_s": batch_size / per_batch}


# ----------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", choices=sorted(FAMILIES), help="model family to compare")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"],
                        help="tiny: the *_tiny presets (vocab 8192; mae: 32x32 images); small/base: gpt2 (vocab "
                             "50257), llama_small (32000), bert_base (30522), vit_base (224x224 images)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per side, alternating (default 8)")
    parser.add_argument("--steps-per-round", type=int, default=2, help="training steps timed per round (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (default 2)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences (or images) per step (default: per size and device)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: per size; text only)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: autocast to bfloat16 with fp32 weights, as train.mixed_precision=bf16")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the lmssl objective, as train.compile=true (the reference stays eager); "
                             "the compile time shows in the warm-up column")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute activations in the backward pass on every side, as "
                             "train.activation_checkpointing=true (the reference through gradient_checkpointing_enable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice); 1 gives the steadiest CPU-time ratio")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU, glibc: keep freed memory in the process (no page faults from re-allocation) for both "
                             "sides; default: the allocator's defaults")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every figure to this JSON file")


def _command_line(args: argparse.Namespace, batch: int, seq: int | None, device: str) -> str:
    parts = ["lmssl bench", args.model, f"--size {args.size}", f"--device {device}", f"--rounds {args.rounds}",
             f"--steps-per-round {args.steps_per_round}", f"--warmup {args.warmup}", f"--batch-size {batch}",
             *([f"--seq-len {seq}"] if seq is not None else []), f"--precision {args.precision}"]
    if args.threads:
        parts.append(f"--threads {args.threads}")
    if args.compile:
        parts.append("--compile")
    if args.activation_checkpointing:
        parts.append("--activation-checkpointing")
    if args.keep_freed_memory:
        parts.append("--keep-freed-memory")
    return " ".join(parts)


# --- the CPU allocator
#
# glibc's malloc hands large freed blocks back to the OS (munmap above its mmap threshold, a
# heap trim above its trim threshold). A training step frees and re-allocates activations of
# the same sizes every step, so the next step maps fresh pages, which the kernel zero-fills
# on first touch: minor page faults, a cost of how a model allocates rather than of its
# arithmetic. The bench counts them per step and, with --keep-freed-memory, takes them away
# from both sides, so the two comparisons can be read side by side (benchmarks/RESULTS.md).

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap, not from their own mapping
_TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt's int argument takes: never trim


def allocator_settings() -> list[str]:
    """The allocator choices this process's environment makes, as ``NAME=value`` strings."""
    return [f"{k}={v}" for k, v in sorted(os.environ.items())
            if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")]


def keep_freed_memory() -> bool:
    """Keep freed memory in the process (glibc on Linux); True when the settings took."""
    if not sys.platform.startswith("linux") or allocator_settings():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def _allocator_line(args: argparse.Namespace) -> str:
    if args.keep_freed_memory:
        return "glibc keeps freed memory (--keep-freed-memory)"
    return ", ".join(allocator_settings()) or "defaults (large freed blocks go back to the OS)"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _check_args(args: argparse.Namespace) -> None:
    for name in ("rounds", "steps_per_round"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 1:
        raise UserError(f"--warmup must be at least 1 (the first step allocates optimizer state), got {args.warmup}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    for name in ("batch_size", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "batch_size" else 2):
            raise UserError(f"--{name.replace('_', '-')} is too small: {value}")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    family = FAMILIES[args.model]
    images = family.unit == "images"
    if images and args.seq_len is not None:
        raise UserError(f"--seq-len is for text models; {args.model} takes whole images (its --size sets their size)")
    size = family.sizes[args.size]
    device_str = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_str == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; pass --device cpu")
    device = torch.device(device_str)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        if not keep_freed_memory():
            raise UserError("--keep-freed-memory needs glibc on Linux and no MALLOC_*, GLIBC_TUNABLES or LD_PRELOAD "
                            "in the environment; unset those or drop the flag")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # config notes about unused token ids and the default loss
    batch_size = args.batch_size or (size.batch_cuda if device.type == "cuda" else size.batch_cpu)
    seq = args.seq_len or size.seq_len

    from lmssl.config import load_config
    from lmssl.train.flops import device_peak_flops
    from lmssl.train.optim import make_optimizer

    max_pos = ["model.max_positions=" + str(seq)] if seq > _preset_positions(size.preset) else []
    cfg = load_config(None, [f"model.preset={size.preset}", f"model.vocab_size={size.vocab}",
                             f"data.block_size={seq}", f"train.micro_batch_size={batch_size}",
                             *max_pos, *size.overrides])
    cfg.train.mixed_precision = "bf16" if args.precision == "bf16" else "no"
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    autocast = ((lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None
                else contextlib.nullcontext)
    command = _command_line(args, batch_size, None if images else seq, device.type)
    if images:
        v = cfg.vision
        what = {"mae": f"{cfg.mae.mask_ratio:.0%} hidden", "clip": f"with {cfg.data.block_size}-token captions"}.get(
            args.model, "two views per image")
        workload = (f"{size.preset}, {v.image_size}x{v.image_size} images in {v.patch_size}x{v.patch_size} patches "
                    f"({seq} each, {what}), batch {batch_size}")
    else:
        workload = f"{size.preset}, vocab {size.vocab}, batch {batch_size} x {seq} tokens"
    print(f"{command}\n  {workload}, {args.precision}, {_device_name(device)}"
          + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""), flush=True)

    batch = {k: v.to(device) for k, v in family.make_batch(cfg, batch_size, torch.Generator().manual_seed(0)).items()}

    # build and warm up each side inside a memory probe: weights, gradients, AdamW state, activations
    contenders = [("lmssl", family.build_lmssl), ("transformers", family.build_reference)]
    if family.baseline is not None:
        contenders.append(family.baseline)
    sides: list[Side] = []
    for name, builder in contenders:
        with MemoryProbe(device) as probe:
            torch.manual_seed(0)
            model, loss_fn = builder(cfg)
            model.to(device).train()
            if args.activation_checkpointing:
                _checkpoint_activations(model, name)
            params = sum(p.numel() for p in model.parameters())
            optimizer = make_optimizer(model, cfg.optim, device.type)
            if name != "transformers" and not images:  # lmssl text objectives return (loss, metrics)
                model_fn = torch.compile(model) if args.compile else model
                loss_fn = (lambda f: lambda b: f(b)[0])(model_fn)
            side = Side(name, model, loss_fn, optimizer, params)
            side.attention = describe_attention(side, batch, autocast)
            side.warmup_s = time_steps(side, batch, args.warmup, device, autocast)[0]
        side.peak_mem = probe.bytes if device.type == "cuda" else cpu_step_peak(side, batch, autocast)
        sides.append(side)
        print(f"  {name:<22} {params / 1e6:8.2f}M params, attention: {side.attention}, warm-up {side.warmup_s:.1f}s",
              flush=True)

    for r in range(args.rounds):  # each round starts with the next side: load falls on all alike
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            wall, cpu, faults = time_steps(side, batch, args.steps_per_round, device, autocast)
            side.round_s.append(wall)
            side.round_cpu_s.append(cpu)
            side.round_faults.append(faults)

    lm, ref = sides[:2]
    units_per_step = batch_size * (1 if images else seq)

    def unit_flops(side: Side) -> float:  # lmssl's count; the reference is given lmssl's
        model = side.model if side.name != "transformers" else lm.model
        return model.flops_per_sample() if images else objective_flops_per_token(model, cfg, seq)

    peak, peak_source = device_peak_flops(device)
    step_s = statistics.median(lm.round_s) / args.steps_per_round
    data = (measure_image_data_path if images else measure_data_path)(cfg, batch_size, step_s, lm.model)

    result: dict[str, Any] = {
        "command": command, "model": args.model, "size": args.size, "preset": size.preset, "unit": family.unit,
        "batch_size": batch_size, "seq_len": seq, "precision": args.precision, "compile": bool(args.compile),
        "activation_checkpointing": bool(args.activation_checkpointing),
        "rounds": args.rounds, "steps_per_round": args.steps_per_round, "warmup": args.warmup,
        "device": device.type, "device_name": _device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__, "transformers": _version("transformers"), "lmssl": _version("lmssl"),
        "config": cfg.to_dict()["model"], "optim": cfg.to_dict()["optim"],
        **({"vision": cfg.to_dict()["vision"], args.model: cfg.to_dict()[args.model]} if images else {}),
        f"flops_per_{family.unit[:-1]}": unit_flops(lm), "peak_flops": peak, "peak_source": peak_source,
        "memory_source": MEMORY_SOURCES.get(device.type, "n/a"), "allocator": _allocator_line(args) if device.type == "cpu" else None,
        **_ratios(lm, ref),
        "data": data,
    }
    keys = ["lmssl", "reference"] + (["baseline"] if len(sides) > 2 else [])
    for side, key in zip(sides, keys):
        per_s = units_per_step * args.steps_per_round / statistics.median(side.round_s)
        flops = unit_flops(side)
        result[key] = {
            "name": type(side.model).__name__ if key == "reference" else side.name,
            "params": side.params, f"{family.unit}_per_s": per_s, "tflops": per_s * flops / 1e12,
            "mfu": per_s * flops / peak if peak else None,
            "step_s": statistics.median(side.round_s) / args.steps_per_round, "round_s": side.round_s,
            "round_cpu_s": side.round_cpu_s,
            "page_faults_per_step": statistics.median(side.round_faults) / args.steps_per_round,
            "warmup_s": side.warmup_s, "peak_mem_bytes": side.peak_mem, "attention": side.attention,
            "final_loss": side.final_loss,
        }
    if len(sides) > 2:
        # how much faster lmssl's objective is than the same model built the slow way
        result["baseline"].update(_ratios(lm, sides[2]), flops_per_unit=unit_flops(sides[2]))
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


def _checkpoint_activations(model: nn.Module, name: str) -> None:
    if name == "transformers":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        from lmssl.models import set_activation_checkpointing

        set_activation_checkpointing(model)


def _ratios(fast: Side, slow: Side) -> dict[str, Any]:
    """Per-round throughput ratios ``fast / slow``: median, min, max; the same from process
    CPU time (steadier than wall time on a loaded CPU; with one thread it ignores time spent
    descheduled; on a GPU it measures only the host side)."""
    ratios = [b / a for a, b in zip(fast.round_s, slow.round_s)]
    cpu = [b / a for a, b in zip(fast.round_cpu_s, slow.round_cpu_s)]
    return {"ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios), "ratios": ratios,
            "ratio_cpu_time": statistics.median(cpu), "ratio_cpu_time_min": min(cpu), "ratio_cpu_time_max": max(cpu)}


def objective_flops_per_token(objective: nn.Module, cfg, seq: int) -> float:
    """The objective's own training FLOPs per token, or the generic transformer count."""
    fpt = getattr(objective, "flops_per_token", None)
    if callable(fpt):
        return float(fpt(seq))
    if fpt is not None:
        return float(fpt)
    from lmssl.models.flops import transformer_flops_per_token

    return transformer_flops_per_token(cfg.model, objective.backbone.num_params(), seq)


def _preset_positions(preset: str) -> int:
    from lmssl.models.presets import PRESETS

    return PRESETS[preset]["max_positions"]


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def format_table(r: dict[str, Any]) -> str:
    unit = r["unit"]
    keys = [k for k in ("lmssl", "reference", "baseline") if k in r]
    w = max([22] + [len(r[k]["name"]) for k in keys])  # the name column fits the longest class name
    head = f"  {'':<{w}} {'params':>9} {unit + '/s':>11} {'TFLOP/s':>9} {'MFU':>7} {'peak mem':>10} {'step':>8} {'warm-up':>8}"
    lines = ["", head]
    for key in keys:
        s = r[key]
        mem = f"{s['peak_mem_bytes'] / 2**20:,.0f} MiB" if s["peak_mem_bytes"] is not None else "n/a"
        mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "n/a"
        lines.append(f"  {s['name']:<{w}} {s['params'] / 1e6:>8.2f}M {s[unit + '_per_s']:>11,.0f} "
                     f"{s['tflops']:>9.4f} {mfu:>7} {mem:>10} {s['step_s'] * 1e3:>6.0f}ms {s['warmup_s']:>7.1f}s")

    def ratio_line(label: str, x: dict[str, Any]) -> str:
        return (f"  {label}: {x['ratio']:.2f}x (median of {r['rounds']} rounds; min {x['ratio_min']:.2f}x, "
                f"max {x['ratio_max']:.2f}x)"
                + (f"; by CPU time {x['ratio_cpu_time']:.2f}x [{x['ratio_cpu_time_min']:.2f}, "
                   f"{x['ratio_cpu_time_max']:.2f}]" if r["device"] == "cpu" else ""))

    per = unit[:-1]
    lines += ["", ratio_line("lmssl / transformers throughput", r)]
    if "baseline" in r:
        lines.append(ratio_line(f"lmssl / {r['baseline']['name']} throughput", r["baseline"]))
    lines.append(f"  FLOPs/{per} {r[f'flops_per_{per}'] / 1e6:,.1f}M (lmssl's count; the reference is given lmssl's) "
                 f"peak {r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_source']}); memory: {r['memory_source']}")
    if r.get("allocator"):
        faults = ", ".join(f"{r[k]['name']} {r[k]['page_faults_per_step']:,.0f}" for k in keys)
        lines.append(f"  CPU allocator: {r['allocator']}; minor page faults per step: {faults}")
    if r["model"] in ("bert", "modernbert"):
        lines.append("  (the reference computes the vocabulary projection at every position; its TFLOP/s and MFU use "
                     "lmssl's masked-only count, so they equal its throughput share, not its arithmetic)")
    if "baseline" in r:
        lines.append(f"  ({r['baseline']['name']}: its own count, {r['baseline']['flops_per_unit'] / 1e6:,.1f}M FLOPs/"
                     f"{per}: the encoder runs on every patch)")
    d = r["data"]
    if "image_side" in d:
        lines.append(f"  data path: decode + resize {d['image_side']}px PNGs, draw the views' parameters, prepare_batch, "
                     f"{d['images_per_s']:,.0f} images/s on one core = {d['collate_s_per_batch'] * 1e3:.1f} ms/batch "
                     f"= {d['collate_fraction']:.2%} of a step")
    else:
        lines.append(
            f"  data path: tokenizer {d['tokenize_tokens_per_s']:,.0f} tokens/s ({d['tokenize_mb_per_s']:.1f} MB/s) = "
            f"{d['tokenize_fraction']:.2%} of a step if tokenized on the fly; packing + collation "
            f"{d['collate_s_per_batch'] * 1e3:.2f} ms/batch = {d['collate_fraction']:.2%} of a step"
            + (" (with prepare_batch)" if d["includes_prepare_batch"] else ""))
    return "\n".join(lines)
