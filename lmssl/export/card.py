"""The model card (``README.md``): Hub metadata in YAML front matter, then what the model
is, how to load it, how it was trained (recipe, data, steps, tokens, metrics, loss curve)
and how the export was checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmssl import objectives
from lmssl.config import RunConfig

# the bundled data (lmssl/data)
BUNDLED_DATASET = {"text": "kjv-bible", "images": "fashion_mnist", "image_text": "noto-emoji-cldr"}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "masked-lm": "AutoModelForMaskedLM", "backbone": "AutoModel",
                "mae": "AutoModelForPreTraining", "image-backbone": "AutoModel"}


@dataclass
class CardFacts:
    """Everything the card states, gathered by the exporter."""

    cfg: RunConfig
    run_dir: str
    step: int
    tokens_seen: int
    metrics: dict[str, float]
    n_params: int
    license: str
    architecture: str  # transformers class name, or "lmssl TextBackbone" for an lmssl-format export
    kind: str  # causal-lm | masked-lm | backbone | mae | native
    pipeline_tag: str | None
    checks: dict[str, float]  # name -> max |difference| found by the verification
    loss_curve: str | None  # file name inside the folder
    notes: list[str] = field(default_factory=list)
    probe_table: str = ""  # the run's `lmssl probe` table (probe.json), when it was probed
    load_snippet: str = ""  # replaces the transformers snippet (lmssl-format exports)
    usage: str = ""  # the converter's "How to use" code ({name}: the folder or Hub name); "": the text default
    extra: str = ""  # the converter's own markdown section (CLIP: the zero-shot table), after the metrics


def datasets_of(cfg: RunConfig) -> tuple[list[str], str]:
    """(Hub metadata ``datasets`` list, one-line human description) of the pretraining data."""
    d = cfg.data
    if d.train_files:
        files = ", ".join(Path(f).name for f in d.train_files[:5]) + (" ..." if len(d.train_files) > 5 else "")
        return [], f"local files: {files}"
    if d.dataset:
        desc = d.dataset + (f" ({d.dataset_config})" if d.dataset_config else "") + f", split {d.train_split}"
        return [d.dataset], desc
    if cfg.modality == "images":
        return [BUNDLED_DATASET["images"]], "the Fashion-MNIST subset bundled with lmssl (Zalando Research, MIT)"
    if cfg.modality == "image_text":
        return [BUNDLED_DATASET["image_text"]], ("the emoji pairs bundled with lmssl (Noto Color Emoji, OFL-1.1; "
                                                 "CLDR names and keywords, Unicode licence)")
    return [BUNDLED_DATASET["text"]], "the King James Version of the Bible bundled with lmssl (public domain)"


def front_matter(facts: CardFacts) -> str:
    from huggingface_hub import ModelCardData

    cfg = facts.cfg
    datasets, _ = datasets_of(cfg)
    data = ModelCardData(library_name="transformers" if facts.kind != "native" else "lmssl",
                         license=facts.license, datasets=datasets or None,
                         tags=["lmssl", cfg.objective, cfg.model.family], pipeline_tag=facts.pipeline_tag)
    return f"---\n{data.to_yaml()}\n---\n"


def _usage(facts: CardFacts, name: str) -> str:
    if facts.load_snippet:
        return facts.load_snippet
    if facts.usage:
        return "```python\n" + facts.usage.replace("{name}", name) + "\n```"
    auto = AUTO_CLASSES[facts.kind]
    lines = [f"from transformers import {auto}, AutoTokenizer", "",
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
             f'model = {auto}.from_pretrained("{name}")']
    if facts.kind == "causal-lm":
        lines += ['ids = tokenizer("And God said", return_tensors="pt")["input_ids"]',
                  "out = model.generate(ids, max_new_tokens=40, do_sample=True, top_k=50)",
                  "print(tokenizer.decode(out[0]))"]
    elif facts.kind == "masked-lm":
        lines += ["", "from transformers import pipeline", "",
                  f'fill = pipeline("fill-mask", model="{name}")',
                  'print(fill("And God said, Let there be {}.".format(fill.tokenizer.mask_token)))']
    else:
        lines += ['hidden = model(**tokenizer("And God said", return_tensors="pt")).last_hidden_state']
    return "```python\n" + "\n".join(lines) + "\n```"


def _description(name: str) -> str:
    try:
        return objectives.get(name).description or name
    except Exception:  # an objective this lmssl does not have
        return name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def render(facts: CardFacts, name: str) -> str:
    """The full README.md text; ``name`` is what users pass to ``from_pretrained``."""
    cfg, m = facts.cfg, facts.cfg.model
    _, data_desc = datasets_of(cfg)
    out = [front_matter(facts), f"# {name}", ""]
    out.append(f"A {facts.n_params / 1e6:.2f}M-parameter {m.family} model ({m.n_layers} layers, width {m.dim}, "
               f"{m.n_heads} heads) pretrained with lmssl by "
               f"{_description(cfg.objective)}. Exported as `{facts.architecture}`.")
    out += ["", "## How to use", "", _usage(facts, name), ""]
    if facts.notes:
        out += ["Notes:", ""] + [f"- {n}" for n in facts.notes] + [""]
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    if cfg.modality == "image_text":
        v, t = cfg.vision, cfg.clip.text
        inputs = [f"- image tower: {m.family}, {m.n_layers} layers, width {m.dim}; images "
                  f"{v.image_size}x{v.image_size}, {v.patch_size}x{v.patch_size} patches",
                  f"- text tower: {t.n_layers} layers, width {t.dim}; tokenizer `{cfg.data.tokenizer}` ({t.vocab_size} "
                  f"tokens), captions of at most {cfg.data.block_size} tokens",
                  f"- optimizer steps: {facts.step:,} ({per_step} image-caption pairs per step on each process)",
                  f"- pairs seen: {facts.tokens_seen:,}"]
    elif cfg.modality == "images":
        v = cfg.vision
        inputs = [f"- images: {v.image_size}x{v.image_size}, {v.channels} channel(s), {v.patch_size}x{v.patch_size} "
                  "patches",
                  f"- optimizer steps: {facts.step:,} ({per_step} images per step on each process)",
                  f"- images seen: {facts.tokens_seen:,}"]
    else:
        inputs = [f"- tokenizer: `{cfg.data.tokenizer}` ({m.vocab_size} tokens), sequences of {cfg.data.block_size} "
                  "tokens",
                  f"- optimizer steps: {facts.step:,} ({per_step} sequences per step on each process)",
                  f"- tokens seen: {facts.tokens_seen:,}"]
    out += ["## Training", "", f"- objective: `{cfg.objective}`", f"- data: {data_desc}", *inputs,
            f"- run directory: `{facts.run_dir}`", ""]
    if facts.metrics:
        out += ["Final metrics:", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {_fmt(v)} |" for k, v in facts.metrics.items()]
        out.append("")
    if facts.extra:
        out += [facts.extra.rstrip(), ""]
    if facts.loss_curve:
        out += [f"![loss curve]({facts.loss_curve})", ""]
    if facts.probe_table:
        out += ["## Linear probe and k-NN (`lmssl probe`)", "",
                "Frozen features of this model beside the same network at initialisation"
                " (and, for images, raw pixels):", "", "```", facts.probe_table, "```", ""]
    out += ["## Recipe", "", "The complete run configuration (reproduce with `lmssl pretrain recipe.yaml`):", "",
            "```yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(), "```", ""]
    if facts.checks:
        out += ["## Export check", "",
                "The lmssl model and this folder, reloaded, were run on the same batch in float32:", ""]
        out += [f"- {k}: max |difference| = {v:.3g}" for k, v in facts.checks.items()]
        out.append("")
    return "\n".join(out)
