"""Typed run configuration: a YAML recipe plus dotted ``key=value`` overrides.

A recipe is a YAML mapping whose top-level sections mirror :class:`RunConfig`
(``model``, ``data``, ``train``, ``optim`` and one section per objective). A model
section may name a ``preset`` (see :mod:`lmssl.models.presets`); the fields written
beside it override the preset's values. Every value is checked against the field's
type, and an unknown key is an error that names the closest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from lmssl import registry
from lmssl.errors import UserError


@dataclass
class ModelConfig:
    preset: str = ""  # named size/architecture preset that fills the fields below
    family: str = "gpt2"  # architecture family, decides the transformers class at export: gpt2 | llama | bert | modernbert | electra | vit | resnet | custom
    vocab_size: int = 0  # 0: taken from the tokenizer
    pad_vocab_multiple: int = 64  # embedding rows padded up to a multiple of this (speed); padded ids are never predicted
    max_positions: int = 1024  # longest sequence the position table / RoPE cache supports
    dim: int = 768  # residual stream width
    embedding_dim: int = 0  # 0: dim; else token/position/type embeddings (and their norm) this wide, then a linear map to dim (ELECTRA's embeddings_project)
    n_layers: int = 12  # transformer blocks
    n_heads: int = 12  # attention heads
    n_kv_heads: int = 0  # 0: same as n_heads; fewer gives grouped-query attention
    mlp_hidden: int = 0  # 0: 4 * dim (or 8/3 * dim rounded to 64 for gated MLPs)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5  # epsilon inside every norm
    norm_position: str = "pre"  # pre (GPT-2, Llama) | post (original BERT)
    activation: str = "gelu_tanh"  # gelu | gelu_tanh | silu | relu
    gated_mlp: bool = False  # True: SwiGLU-style gate * up projection
    positions: str = "learned"  # learned | rope | sincos (fixed; 2-D over the patch grid for images) | none
    rope_theta: float = 10000.0  # RoPE base frequency (of the global blocks, when some are local)
    bias: bool = True  # biases in linear layers and norms
    dropout: float = 0.0  # dropout on embeddings, attention probabilities and residual branches
    tie_embeddings: bool = True  # output projection shares the token embedding matrix
    type_vocab_size: int = 0  # >0 adds token-type (segment) embeddings, as BERT does
    embedding_norm: bool = False  # norm after the embeddings (BERT, ModernBERT)
    first_attn_norm: bool = True  # False: block 0 has no norm before its attention (pre-norm only; ModernBERT, whose embedding norm does that job)
    local_attention: int = 0  # >0: local blocks attend only to tokens at most local_attention // 2 positions away, either side (ModernBERT: 128); 0: every block is global
    global_every: int = 1  # with local_attention: blocks 0, n, 2n, ... are global, the others local (ModernBERT: 3); 1: all global
    local_rope_theta: float = 0.0  # RoPE base frequency of the local blocks (0: rope_theta; ModernBERT: 10000, beside 160000 global)
    head_transform: bool = False  # dense + activation + norm before the vocabulary projection (BERT MLM head)
    head_bias: bool = False  # bias on the vocabulary projection
    causal: bool = True  # default attention direction of the core; objectives may override per call
    init_std: float = 0.02  # std of the normal initialisation of weights
    scale_residual_init: bool = True  # pre-norm: residual output projections start at init_std / sqrt(2 n_layers) (GPT-2); false: at init_std (ViTModel, timm, DINO)
    stem: str = "imagenet"  # resnet family only: imagenet (7x7 conv + max-pool) | cifar (3x3 conv, no pool: images of ~32 px)

    # Fields added after runs existed: left out of the run fingerprint while they hold their
    # default, so that a run started before they were added still resumes.
    LATE_FIELDS: ClassVar[tuple[str, ...]] = ("first_attn_norm", "local_attention", "global_every", "local_rope_theta",
                                              "stem", "embedding_dim", "scale_residual_init")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # files, folders or globs; empty: bundled corpus unless `dataset` is set
    validation_files: list[str] = field(default_factory=list)  # held-out files; empty: bundled validation split or a slice of train
    dataset: str = ""  # Hugging Face dataset name (e.g. HuggingFaceFW/fineweb-edu), used when train_files is empty
    dataset_config: str = ""  # dataset configuration name (e.g. sample-10BT)
    train_split: str = "train"  # split read for training
    validation_split: str = ""  # split read for validation; empty: hold out validation_fraction of training documents
    validation_fraction: float = 0.01  # documents held out when no validation split or files are given
    text_column: str = "text"  # column holding the text in json/csv/parquet/Hub data
    streaming: bool = False  # stream the corpus instead of tokenizing it all up front
    shuffle_buffer: int = 10000  # documents in the streaming shuffle buffer
    max_documents: int = 0  # >0: read at most this many training documents (images, for image objectives)
    block_size: int = 256  # tokens per training sequence
    tokenizer: str = "default"  # "default" (shipped), a local tokenizer folder, or a Hub name
    packing: bool = True  # pack documents into full blocks; False: one document per row, padded (line-by-line)
    num_proc: int = 0  # processes for tokenization (0: one)
    eval_blocks: int = 64  # validation blocks (images, for image objectives) used for each evaluation (0: all)
    num_workers: int = 0  # image runs: DataLoader worker processes that decode images (0: in the training process)
    tokenizer_model: str = "bpe"  # tokenizer=auto: bpe (byte-level, the default's kind) | unigram | wordpiece
    tokenizer_vocab_size: int = 8192  # tokenizer=auto: entries, special tokens included (the default's size)

    # Fields added after runs existed: left out of the run fingerprint while they hold their default.
    LATE_FIELDS: ClassVar[tuple[str, ...]] = ("tokenizer_model", "tokenizer_vocab_size")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | lars (layer-wise adaptive rate scaling, for large-batch SimCLR/BYOL; biases and norms excluded)
    lr: float = 6e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    weight_decay: float = 0.1  # decoupled weight decay, applied to matrices only
    weight_decay_end: float = -1.0  # >= 0: weight decay follows a cosine from weight_decay to this at the last step (DINO: 0.04 -> 0.4); -1: constant
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100  # linear warm-up steps
    schedule: str = "cosine"  # cosine | linear | constant
    fused: bool = True  # fused AdamW kernel where the device supports it
    momentum: float = 0.9  # LARS momentum
    lars_eta: float = 0.001  # LARS trust coefficient (the LARS paper, SimCLR, BYOL, VICReg)


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"  # run directory: checkpoints, logs, plots
    max_steps: int = 1000  # optimizer steps
    micro_batch_size: int = 16  # sequences per process per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    mixed_precision: str = "no"  # no | bf16 | fp16
    compile: bool = False  # torch.compile the objective
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass: less memory, one more forward pass of the blocks
    seed: int = 0  # seeds data order, initialisation and every random draw
    log_every: int = 10  # steps between log lines
    eval_every: int = 200  # steps between evaluations (0: only at the end)
    save_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk
    overwrite: bool = False  # allow starting over in a directory that holds another run
    trackers: list[str] = field(default_factory=list)  # extra Accelerate trackers: tensorboard, wandb, ...
    sample_prompt: str = "And God said"  # prompt for the text sample printed after training (decoders)
    sample_tokens: int = 60  # tokens generated for that sample
    max_bad_steps: int = 0  # non-finite steps skipped before stopping, checked at log/save steps (0: stop at the first)
    progress: bool = True  # tqdm progress bar on the main process


@dataclass
class VisionConfig:
    image_size: int = 224  # square input images, in pixels (a multiple of patch_size)
    patch_size: int = 16  # square patches; each becomes one token
    channels: int = 3  # colour channels (3: RGB, 1: greyscale)
    image_column: str = "image"  # column holding the images in a Hugging Face dataset (CIFAR-10: img)
    label_column: str = "label"  # class labels, for lmssl probe (image folders: one sub-folder per class)
    load_size: int = 0  # images are decoded and resized to this square size on the CPU before the views are cut (0: image_size)
    num_classes: int = 0  # classes of the labels the monitors read (0: taken from the data; no labels: monitors that need them are off)
    crop_min_scale: float = 0.2  # training crops cover a random 20-100% of the image's area, then are resized
    hflip: bool = True  # flip training images left-right half of the time
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per-channel normalisation (ImageNet's)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    position_scale: float = 1.0  # a ViT's fixed sin-cos positions times this (1: MAE's table, entries up to 1; lower: the image content outweighs them at initialisation, as ViTModel's learned table of std 0.02 does)
    cls_init_std: float = -1.0  # std of a ViT's class token at initialisation (< 0: model.init_std; timm: 1e-6)


@dataclass
class MonitorConfig:
    knn_k: int = 20  # neighbours of the k-NN monitor (weighted vote, cosine similarity)
    bank_images: int = 2000  # labelled training images whose features form the k-NN bank at each evaluation (0: off)
    query_images: int = 1000  # held-out images classified by the k-NN monitor and scored for collapse
    online_probe: bool = True  # train a linear classifier on detached features during pretraining (image runs with labels)
    probe_lr: float = 1e-3  # peak learning rate of the online probe (AdamW group of its own, no weight decay)


def _objective_sections() -> dict[str, Any]:
    return {name: cls() for name, cls in registry.sections().items()}


@dataclass
class RunConfig:
    """A run: the shared sections below, plus one section per registered objective
    (``mlm``, ``cpc``, ``mae``, ...: each objective's file defines its dataclass), read
    as ``cfg.mae`` and written in YAML as a top-level ``mae:`` mapping."""

    objective: str = "clm"  # a registered objective: clm | mlm | cpc (text), mae, ... (images); see lmssl.objectives
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)  # image geometry and views for vision models
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # k-NN, online probe and collapse monitors (images)
    sections: dict[str, Any] = field(default_factory=_objective_sections, repr=False)  # objective name -> its section

    def __getattr__(self, name: str) -> Any:  # only called for names that are not fields: cfg.mae, cfg.mlm, ...
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"RunConfig has no section '{name}'")

    @property
    def modality(self) -> str:
        """What the objective reads: text | images | image_text."""
        return registry.get(self.objective).modality

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: dataclasses.asdict(getattr(self, f.name)) if f.name != "objective" else self.objective
             for f in dataclasses.fields(self) if f.name != "sections"}
        d.update({name: dataclasses.asdict(section) for name, section in self.sections.items()})
        return d

    def fingerprint(self) -> str:
        """Hash of what makes two runs the same run (model, data, objective, seed)."""
        d = self.to_dict()
        key = {k: d[k] for k in ("objective", "model", "data", self.objective) if k in d}
        if self.modality != "text":
            key["vision"] = {k: d["vision"][k] for k in ("image_size", "patch_size", "channels", "image_column")}
            if self.vision.position_scale != VisionConfig().position_scale:  # the table is part of the model
                key["vision"]["position_scale"] = self.vision.position_scale
        key["seed"] = self.train.seed
        for volatile in ("eval_blocks", "num_proc", "num_workers"):
            key["data"].pop(volatile, None)
        for section, cls in (("model", ModelConfig), ("data", DataConfig)):
            defaults = cls()
            for late in cls.LATE_FIELDS:
                if key[section].get(late) == getattr(defaults, late):
                    key[section].pop(late)
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if cls is RunConfig and f.name == "sections":
            continue
        t = _hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    if cls is RunConfig:
        for name, section in registry.sections().items():
            keys += _all_keys(section, f"{name}.")
    return keys


def section_names() -> list[str]:
    """Every top-level key a recipe may hold: the shared sections, then the objectives'."""
    return [f.name for f in dataclasses.fields(RunConfig) if f.name != "sections"] + list(registry.sections())


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _unknown(key: str) -> UserError:
    near = difflib.get_close_matches(key, _all_keys(RunConfig), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else f"; valid sections: {', '.join(section_names())}"
    return UserError(f"unknown config key '{key}'{hint}")


# string keys whose documented values include "no", which YAML reads as False when bare
NO_IS_A_VALUE = {"train.mixed_precision"}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check ``value`` against the annotation ``typ``; convert the harmless cases (int -> float)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (inner,) = typing.get_args(typ)
        if value is None:
            return []
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' expects true or false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"config key '{key}' expects an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}' expects a number, got {value!r}")
    if typ is str:
        if value is False and key in NO_IS_A_VALUE:  # YAML 1.1 reads a bare `no` as False
            return "no"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        quote = " (YAML reads a bare yes/no, on/off, true/false as a boolean: quote the value)" \
            if isinstance(value, bool) else ""
        raise UserError(f"config key '{key}' expects a string, got {value!r}{quote}")
    return value


def _apply(obj: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    for name, value in mapping.items():
        key = prefix + str(name)
        if isinstance(obj, RunConfig) and name in obj.sections:  # an objective's own section
            if not isinstance(value, dict):
                raise UserError(f"config section '{key}' must be a mapping of keys to values, got {value!r}")
            _apply(obj.sections[name], value, key + ".")
            continue
        if name == "sections" or not any(f.name == name for f in dataclasses.fields(obj)):
            raise _unknown(key)
        typ = _hints(type(obj))[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise UserError(f"config section '{key}' must be a mapping of keys to values, got {value!r}")
            sub = getattr(obj, name)
            if isinstance(sub, ModelConfig) and "preset" in value:
                _apply_preset(sub, value["preset"], key)
            _apply(sub, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, typ))


def _apply_preset(model: ModelConfig, name: Any, key: str) -> None:
    from lmssl.models.presets import PRESETS

    if name in ("", None):
        return
    if name not in PRESETS:
        near = difflib.get_close_matches(str(name), PRESETS, n=3)
        raise UserError(f"unknown model preset '{name}' in '{key}'; choose one of: {', '.join(sorted(PRESETS))}"
                        + (f" (closest: {', '.join(near)})" if near else ""))
    for k, v in PRESETS[name].items():
        setattr(model, k, v)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.max_steps=300", "data.train_files=[a.txt,b.txt]"]`` -> nested dict."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. train.max_steps=300)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}' sets a field inside '{p}', which is not a section")
        node[parts[-1]] = value
    return nested


def read_recipe(path: Path, name: str | Path, expected: str) -> dict:
    """The YAML mapping in ``path``; one-line errors for invalid YAML or a non-mapping
    (``expected`` says what the mapping should hold, e.g. "sections (model:, ...)")."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe '{name}' is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe '{name}' must be a mapping of {expected}")
    return data


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Build a :class:`RunConfig` from a YAML recipe (or defaults) and dotted overrides."""
    cfg = RunConfig()
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"recipe '{recipe}' not found; pass a YAML file such as recipes/gpt_tiny.yaml")
        _apply(cfg, read_recipe(path, recipe, "sections (model:, data:, train:, ...)"))
    _apply(cfg, parse_overrides(list(overrides)))
    validate(cfg)
    return cfg


def config_from_dict(d: dict[str, Any]) -> RunConfig:
    """Rebuild a config saved with :meth:`RunConfig.to_dict` (presets already expanded)."""
    cfg = RunConfig()
    d = {k: v for k, v in d.items()}
    if "model" in d:
        d["model"] = {k: v for k, v in d["model"].items() if k != "preset"}
        cfg.model.preset = d.get("model", {}).get("preset", "")
    _apply(cfg, d)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Range checks that a type check cannot catch; each failure is one line naming the fix."""
    m, d, t, o = cfg.model, cfg.data, cfg.train, cfg.optim
    checks = [
        (d.block_size >= 2, f"data.block_size must be at least 2, got {d.block_size}"),
        (d.block_size <= m.max_positions,
         f"data.block_size={d.block_size} is larger than model.max_positions={m.max_positions}; lower the block size or raise model.max_positions"),
        (m.dim % m.n_heads == 0, f"model.dim={m.dim} must be divisible by model.n_heads={m.n_heads}"),
        (m.embedding_dim >= 0, f"model.embedding_dim must be >= 0 (0: model.dim), got {m.embedding_dim}"),
        (m.n_layers >= 1, "model.n_layers must be at least 1"),
        (m.norm in ("layernorm", "rmsnorm"), f"model.norm must be layernorm or rmsnorm, got '{m.norm}'"),
        (m.norm_position in ("pre", "post"), f"model.norm_position must be pre or post, got '{m.norm_position}'"),
        (m.positions in ("learned", "rope", "sincos", "none"), f"model.positions must be learned, rope, sincos or none, got '{m.positions}'"),
        (m.activation in ("gelu", "gelu_tanh", "silu", "relu"), f"model.activation must be gelu, gelu_tanh, silu or relu, got '{m.activation}'"),
        (0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}"),
        (m.first_attn_norm or m.norm_position == "pre",
         "model.first_attn_norm=false needs model.norm_position=pre (a post-norm block has no norm before attention)"),
        (m.local_attention >= 0, f"model.local_attention must be >= 0 (0: all blocks global), got {m.local_attention}"),
        (m.global_every >= 1, f"model.global_every must be at least 1 (1: all blocks global), got {m.global_every}"),
        (o.lr > 0, f"optim.lr must be positive, got {o.lr}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (o.schedule in ("cosine", "linear", "constant"), f"optim.schedule must be cosine, linear or constant, got '{o.schedule}'"),
        (t.max_steps >= 1, f"train.max_steps must be at least 1, got {t.max_steps}"),
        (t.micro_batch_size >= 1, f"train.micro_batch_size must be at least 1, got {t.micro_batch_size}"),
        (t.grad_accum >= 1, f"train.grad_accum must be at least 1, got {t.grad_accum}"),
        (t.mixed_precision in ("no", "bf16", "fp16"), f"train.mixed_precision must be no, bf16 or fp16, got '{t.mixed_precision}'"),
        (t.keep_last >= 1, f"train.keep_last must be at least 1, got {t.keep_last}"),
        (cfg.vision.patch_size >= 1 and cfg.vision.image_size % cfg.vision.patch_size == 0,
         f"vision.image_size={cfg.vision.image_size} must be a multiple of vision.patch_size={cfg.vision.patch_size}"),
        (cfg.vision.channels in (1, 3), f"vision.channels must be 1 or 3, got {cfg.vision.channels}"),
        (len(cfg.vision.mean) == len(cfg.vision.std) == cfg.vision.channels and min(cfg.vision.std) > 0,
         f"vision.mean and vision.std need one value per channel ({cfg.vision.channels}), std above 0"),
        (0.0 < cfg.vision.crop_min_scale <= 1.0, f"vision.crop_min_scale must be in (0, 1], got {cfg.vision.crop_min_scale}"),
        (cfg.vision.position_scale > 0, f"vision.position_scale must be positive, got {cfg.vision.position_scale}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    registry.get(cfg.objective).validate_config(cfg)  # the objective's own range checks (unknown names fail here)
