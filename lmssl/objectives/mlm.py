"""Masked language modelling (BERT, RoBERTa): hide ~15% of tokens, predict them from both sides.

The backbone reads every position bidirectionally; the vocabulary projection runs only
at the hidden positions (``select_masked`` -> ``(N, dim)`` -> head -> ``(N, V)``), which
skips ~85% of the head's matmul and of the softmax that ``BertForMaskedLM`` computes.

Masks are drawn per step (RoBERTa's dynamic masking) from the ``mlm.*`` config:

- on the CPU in :meth:`MaskedLM.prepare_batch`, from the loop's generator (the default),
  which also lists the hidden positions (``masked_index``), so that the step on the
  accelerator never waits for the host to learn how many there are;
- or, with ``mlm.mask_on_device=true``, inside :meth:`MaskedLM.forward` on the
  accelerator, from a generator on that device seeded by ``batch["mask_seed"]``, which
  ``prepare_batch`` draws from the loop's generator. Both paths use the same masking
  core, so they give the same statistics (not the same draws). This path reads the
  mask's size on the host, one synchronisation per micro-batch.

Also here: :func:`fill_mask` (top-k fills for ``[MASK]`` / ``<mask>`` in a text), the
end-of-run fill table (:meth:`MaskedLM.report`); the ``lmssl fill-mask`` command
(:mod:`lmssl.cli`) prints it for any text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lmssl.config import ModelConfig, RunConfig
from lmssl.errors import UserError
from lmssl.losses.vocab import linear_cross_entropy
from lmssl.masking import (
    IGNORE_INDEX,
    bernoulli_token_mask,
    masked_positions,
    mlm_corrupt,
    select_masked,
    span_mask,
    whole_word_mask,
    word_start_table,
)
from lmssl.models import LMHead, TextBackbone, eval_mode
from lmssl.models.flops import transformer_flops_per_token
from lmssl.objectives import Objective, mean_pool, register

MASKINGS = ("token", "whole_word", "span")
MASK_MARKERS = ("[MASK]", "<mask>")  # accepted in fill-mask texts, besides the tokenizer's own mask token
WordScheme = Literal["byte_bpe", "sentencepiece", "wordpiece"]


@dataclass
class MLMConfig:
    """The ``mlm:`` section of a recipe."""

    mask_rate: float = 0.15  # fraction of tokens chosen for prediction
    mask_token_prob: float = 0.8  # chosen tokens replaced by the mask token
    random_token_prob: float = 0.1  # chosen tokens replaced by a random token (rest unchanged)
    masking: str = "token"  # token | whole_word | span
    mask_on_device: bool = False  # mask on the accelerator instead of in the CPU collator (reads the mask size back: one sync per micro-batch)
    fill_examples: int = 4  # held-out sentences shown with top-3 fills at the end


# ----------------------------------------------------------------------------- tokenizer facts


def detect_word_scheme(tokens: list[str | None]) -> WordScheme | None:
    """How a vocabulary marks words: "wordpiece" (``##`` continuations), "sentencepiece"
    (``▁`` starts) or "byte_bpe" (``Ġ`` starts); None when it marks none of them."""
    counts = {"wordpiece": 0, "sentencepiece": 0, "byte_bpe": 0}
    for t in tokens:
        if not t:
            continue
        if t.startswith("##") and len(t) > 2:
            counts["wordpiece"] += 1
        elif t.startswith("\u2581"):
            counts["sentencepiece"] += 1
        elif t.startswith("\u0120"):
            counts["byte_bpe"] += 1
    best = max(counts, key=counts.get)
    return best if counts[best] > 0 else None


@dataclass
class MaskingSpec:
    """What masking needs to know about the tokenizer.

    ``word_starts`` is a ``(V,)`` bool table (True for ids that begin a word), built only
    for whole-word masking.
    """

    mask_token_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    word_starts: torch.Tensor | None = None
    scheme: str = ""

    @classmethod
    def from_tokenizer(cls, tokenizer, masking: str = "token") -> MaskingSpec:
        if tokenizer.mask_token_id is None:
            raise UserError("the tokenizer has no mask token, which masked-LM training needs; use data.tokenizer=default "
                            "or a tokenizer made by `lmssl tokenizer train` (they have <mask>)")
        if masking not in MASKINGS:
            raise UserError(f"mlm.masking must be one of {', '.join(MASKINGS)}, got '{masking}'")
        specials = tuple(sorted(set(int(i) for i in tokenizer.all_special_ids)))
        table, scheme = None, ""
        if masking == "whole_word":
            vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
            scheme = detect_word_scheme(vocab)
            if scheme is None:
                raise UserError("mlm.masking=whole_word needs a tokenizer that marks words (byte-level BPE 'Ġ', "
                                "SentencePiece '▁' or WordPiece '##'); use mlm.masking=token or span")
            table = word_start_table(vocab, special_tokens=tokenizer.all_special_tokens, scheme=scheme)
        return cls(int(tokenizer.mask_token_id), len(tokenizer), specials, table, scheme)


# ----------------------------------------------------------------------------- the objective


@register
class MaskedLM(Objective):
    """Bidirectional backbone + LM head; ``batch`` -> cross-entropy at the masked positions.

    ``backbone`` and ``head`` are the names the BERT export maps onto ``BertForMaskedLM``.
    ``spec`` (from the tokenizer) is needed only to mask: a batch that already carries
    ``labels`` runs without it.
    """

    name = "mlm"
    modality = "text"
    Config = MLMConfig
    description = "masked language modelling (BERT-style)"
    loss_label = "loss (nats/masked token)"
    metric_names = {"accuracy": "masked-token accuracy"}
    recipe = "bert_tiny"
    smoke_overrides = ("model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.max_positions=64",
                       "data.block_size=32")

    def __init__(self, cfg: ModelConfig, mlm: MLMConfig | None = None, spec: MaskingSpec | None = None,
                 block_size: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.mlm = mlm if mlm is not None else MLMConfig()
        self.spec = spec
        self.block_size = block_size or cfg.max_positions
        self.backbone = TextBackbone(cfg)
        self.head = LMHead(cfg, self.backbone.tokens)
        # Masking tables: CPU copies for prepare_batch, buffers that follow the model to its
        # device for mask_on_device. Neither is part of the weights.
        self._cpu_special_ids = torch.tensor(spec.special_ids if spec else (), dtype=torch.long)
        self._cpu_word_starts = spec.word_starts if spec is not None and spec.word_starts is not None \
            else torch.zeros(0, dtype=torch.bool)
        self.register_buffer("special_ids", self._cpu_special_ids.clone(), persistent=False)
        self.register_buffer("word_starts", self._cpu_word_starts.clone(), persistent=False)

    # ------------------------------------------------------------------ masking

    def mask_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T)`` ids -> ``(corrupted (B, T), labels (B, T))`` with the ``mlm.*`` settings.

        Runs on the device of ``input_ids``; every draw comes from ``generator``.
        """
        if self.spec is None:
            raise ValueError("this MaskedLM has no masking spec; build it with lmssl.objectives.mlm.build(cfg, tokenizer)")
        m, s = self.mlm, self.spec
        device = input_ids.device
        if device.type == "cpu":
            specials, table = self._cpu_special_ids, self._cpu_word_starts
        else:
            specials, table = self.special_ids.to(device), self.word_starts.to(device)
        if m.masking == "token":
            chosen = bernoulli_token_mask(input_ids, m.mask_rate, generator, specials, attention_mask)
        elif m.masking == "whole_word":
            word_starts = table[input_ids]  # (B, T)
            chosen = whole_word_mask(input_ids, word_starts, m.mask_rate, generator, specials, attention_mask)
        elif m.masking == "span":
            chosen = span_mask(input_ids, m.mask_rate, generator, specials, attention_mask)
        else:
            raise UserError(f"mlm.masking must be one of {', '.join(MASKINGS)}, got '{m.masking}'")
        return mlm_corrupt(input_ids, chosen, generator, mask_token_id=s.mask_token_id, vocab_size=s.vocab_size,
                           special_ids=specials, mask_prob=m.mask_token_prob, random_prob=m.random_token_prob)

    def prepare_batch(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """CPU side, before the batch moves to the device: corrupt ``input_ids`` and add
        ``labels`` (-100 off the mask); with ``mlm.mask_on_device`` only add ``mask_seed``."""
        batch = dict(batch)
        if self.mlm.mask_on_device:
            batch["mask_seed"] = torch.randint(0, 2**62, (), generator=generator, dtype=torch.long)
            return batch
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        batch["input_ids"], batch["labels"] = self.mask_batch(ids, attn, generator)
        batch["masked_index"] = masked_positions(batch["labels"] != IGNORE_INDEX)  # (N,): no device sync for it later
        return batch

    # ------------------------------------------------------------------ forward

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per input token; the vocabulary head runs at ~mask_rate of positions."""
        m = self.cfg
        full = transformer_flops_per_token(m, self.backbone.num_params(), seq_len)
        head = m.dim * m.vocab_size + (m.dim * m.dim if m.head_transform else 0)
        return full - 6.0 * m.dim * m.vocab_size + 6.0 * self.mlm.mask_rate * head

    def flops_per_sample(self) -> float:
        return self.block_size * self.flops_per_token(self.block_size)

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the final hidden states over the real tokens, read bidirectionally: ``(B, dim)``."""
        mask = batch.get("attention_mask")
        return mean_pool(self.hidden(batch["input_ids"], mask), mask)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T) -> (B, T, dim)``, bidirectional."""
        return self.backbone(input_ids, attention_mask, token_type_ids, is_causal=False)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every position: ``(B, T) -> (B, T, vocab_size)`` (as BertForMaskedLM computes it)."""
        return self.head(self.hidden(input_ids, attention_mask))[..., : self.cfg.vocab_size]

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids = batch["input_ids"]
        attn = batch.get("attention_mask")
        labels, index = batch.get("labels"), batch.get("masked_index")
        if labels is None:
            if "mask_seed" not in batch:
                raise ValueError("batch has neither labels nor mask_seed; pass it through MaskedLM.prepare_batch first")
            g = torch.Generator(device=ids.device).manual_seed(int(batch["mask_seed"]))
            ids, labels, index = *self.mask_batch(ids, attn, g), None  # a fresh mask: its positions are found here
        h = self.hidden(ids, attn, batch.get("token_type_ids"))  # (B, T, dim)
        loss, correct, n = self.masked_loss(h, labels, index)
        accuracy = correct / n.clamp(min=1)
        return loss, {"loss": loss.detach(), "accuracy": accuracy, "masked_tokens": n.float()}

    @torch.compiler.disable
    def masked_loss(self, h: torch.Tensor, labels: torch.Tensor,
                    index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head + cross-entropy on the masked rows only: ``h (B, T, dim)``, ``labels (B, T)``
        -> ``(loss, correct, count)``. With N = 0 (nothing maskable) the loss is 0 and every
        head weight still gets a (zero) gradient, as DDP needs.

        Left out of ``torch.compile``: the number of masked rows changes every batch, and a
        compiled graph specialises on it (the chunk loop over rows), so it recompiled at
        each step until dynamo's recompile limit sent the whole forward back to eager; the
        backbone, whose shapes are fixed, compiles once.
        """
        h_sel, y = select_masked(h, labels, IGNORE_INDEX, index)  # (N, dim), (N,)
        return linear_cross_entropy(self.head.transform(h_sel), self.head.weight, y, self.head.bias,
                                    vocab_size=self.cfg.vocab_size)

    # ------------------------------------------------------------------ end-of-run picture

    @torch.no_grad()
    def report(self, tokenizer, eval_batches: list[dict[str, torch.Tensor]], cfg: RunConfig,
               out_dir: Path) -> str:
        """A table of held-out sentences with 1-2 words masked, the true word and the top-3 fills."""
        examples = pick_fill_examples(tokenizer, eval_batches, cfg.mlm.fill_examples, seed=cfg.train.seed,
                                      max_tokens=min(40, self.cfg.max_positions - 1))
        if not examples:
            return "fill-mask: no held-out sentence with a maskable word found"
        lines = [f"fill-mask on held-out text: {len(examples)} sentences, masked words and top-3 fills"]
        hits = total = 0
        for i, (ids, positions) in enumerate(examples, start=1):
            masked = list(ids)
            for p in positions:
                masked[p] = tokenizer.mask_token_id
            probs = self._mask_probs(tokenizer, masked, positions)
            pieces = _surface_pieces(tokenizer, ids, positions)
            shown = "".join(_lead(w) + "[MASK]" if j % 2 else w for j, w in enumerate(pieces))
            lines.append(f"{i:>2}. {shown.strip()}")
            for k, p in enumerate(positions):
                top = probs[k].topk(3)
                fills = [(show_piece(tokenizer.decode([int(t)])), float(v)) for v, t in zip(top.values, top.indices)]
                hit = int(top.indices[0]) == ids[p]
                hits, total = hits + hit, total + 1
                word = show_piece(pieces[2 * k + 1])
                cells = "  ".join(f"{w[:12]:<12} {v:5.3f}" for w, v in fills)
                lines.append(f"      {word[:14]:<14} -> {cells}" + ("   (top-1 correct)" if hit else ""))
        lines.append(f"top-1 correct on {hits} of {total} masked words")
        return "\n".join(lines)

    def _mask_probs(self, tokenizer, ids: list[int], positions: list[int]) -> torch.Tensor:
        """Softmax over the real vocabulary at ``positions`` of one sequence (in eval mode,
        after the document separator training puts before every document): ``(M, V)``."""
        device = next(self.parameters()).device
        x = torch.tensor([_prefix(tokenizer) + ids], device=device)  # (1, T)
        off = len(_prefix(tokenizer))
        with eval_mode(self):
            h = self.hidden(x)[0, [p + off for p in positions]]  # (M, dim)
            logits = self.head(h)[:, : self.cfg.vocab_size].float()  # (M, V)
        return logits.softmax(dim=-1).cpu()


    @classmethod
    def validate_config(cls, cfg: RunConfig) -> None:
        m = cfg.mlm
        if not 0.0 < m.mask_rate < 1.0:
            raise UserError(f"mlm.mask_rate must be in (0, 1), got {m.mask_rate}")
        if not (0.0 <= m.mask_token_prob and 0.0 <= m.random_token_prob and m.mask_token_prob + m.random_token_prob <= 1.0):
            raise UserError(f"mlm.mask_token_prob + mlm.random_token_prob must be in [0, 1] (the rest stays unchanged), "
                            f"got {m.mask_token_prob} + {m.random_token_prob}")
        if m.masking not in MASKINGS:
            raise UserError(f"mlm.masking must be one of {', '.join(MASKINGS)}, got '{m.masking}'")

    @classmethod
    def build(cls, cfg: RunConfig, tokenizer) -> MaskedLM:
        cls.validate_config(cfg)
        return cls(cfg.model, cfg.mlm, MaskingSpec.from_tokenizer(tokenizer, cfg.mlm.masking), cfg.data.block_size)

    def fill_mask(self, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k fills of every mask in ``text`` (see :func:`fill_mask`)."""
        return fill_mask(self, tokenizer, text, top_k)


# ----------------------------------------------------------------------------- fill-mask


def _prefix(tokenizer) -> list[int]:
    """The document separator that precedes every document in training (packed data)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return [sep] if sep is not None else []


def show_piece(text: str) -> str:
    return text.strip() or repr(text)


def _lead(piece: str) -> str:
    """The whitespace a word carried in front of it (kept in front of its [MASK])."""
    return piece[: len(piece) - len(piece.lstrip())]


def _surface_pieces(tokenizer, ids: list[int], positions: list[int]) -> list[str]:
    """Text between and at ``positions``: [before, word_0, between, word_1, ..., after].

    Cut from cumulative decodes, so a word keeps its own leading space and multi-byte
    characters are never split."""
    cuts = [0]
    for p in positions:
        cuts += [p, p + 1]
    cuts.append(len(ids))
    decoded = [tokenizer.decode(ids[:c]) for c in cuts]
    pieces = []
    for a, b, da, db in zip(cuts, cuts[1:], decoded, decoded[1:]):
        pieces.append(db[len(da):] if db.startswith(da) else tokenizer.decode(ids[a:b]))
    return pieces


def split_on_masks(tokenizer, text: str, drop_space: bool = True) -> list[str]:
    """The text around its masks (one more piece than masks). With ``drop_space`` the space
    in front of each mask is dropped, because the word that fills it brings its own."""
    markers = sorted({*MASK_MARKERS, *([tokenizer.mask_token] if tokenizer.mask_token else [])}, key=len, reverse=True)
    parts = re.split("|".join(re.escape(m) for m in markers), text)
    if not drop_space:
        return parts
    return [p[:-1] if i < len(parts) - 1 and p.endswith(" ") else p for i, p in enumerate(parts)]


def encode_with_masks(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` with its mask markers as the mask token, and the mask positions.

    ``[MASK]``, ``<mask>`` and the tokenizer's own mask token all count. The text between
    markers is encoded piece by piece, and the space in front of a marker is dropped:
    with byte-level BPE the word that fills the mask carries its own leading space
    ("The [MASK] sat" -> ``The``, mask, ``Ġsat``, filled by ``Ġcat``).
    """
    if tokenizer.mask_token_id is None:
        raise UserError("this tokenizer has no mask token; fill-mask needs one")
    parts = split_on_masks(tokenizer, text)
    if len(parts) == 1:
        raise UserError(f"no mask in {text!r}; write [MASK] (or <mask>) where a word should be filled in")
    ids: list[int] = []
    positions: list[int] = []
    for i, part in enumerate(parts):
        if part:
            ids += tokenizer(part, add_special_tokens=False)["input_ids"]
        if i < len(parts) - 1:
            positions.append(len(ids))
            ids.append(tokenizer.mask_token_id)
    return ids, positions


@torch.no_grad()
def fill_mask(model: MaskedLM, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-``top_k`` fills for each mask in ``text``: one list of ``(token_str, probability)``
    per mask, in order; ``token_str`` is the decoded token (" cat", with its leading space).

    All masks are predicted together from one forward pass (each independently).
    """
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    ids, positions = encode_with_masks(tokenizer, text)
    limit = model.cfg.max_positions - len(_prefix(tokenizer))
    if len(ids) > limit:
        raise UserError(f"the text is {len(ids)} tokens long; this model reads at most {limit}: shorten it")
    probs = model._mask_probs(tokenizer, ids, positions)  # (M, V)
    k = min(top_k, probs.shape[-1])
    out = []
    for row in probs:
        top = row.topk(k)
        out.append([(tokenizer.decode([int(t)]), float(v)) for v, t in zip(top.values, top.indices)])
    return out


def pick_fill_examples(tokenizer, eval_batches: list[dict[str, torch.Tensor]], count: int, seed: int = 0,
                       max_tokens: int = 40, min_tokens: int = 6) -> list[tuple[list[int], list[int]]]:
    """Up to ``count`` short held-out spans, each with 1 or 2 single-token words to mask.

    A span is a whole sentence (from a document start or the token after a ``.``, ``!`` or
    ``?`` through the next one) of ``min_tokens``..``max_tokens`` tokens, taken from one
    row of each eval batch in turn; a row without one gives the first ``max_tokens``
    tokens of a sentence. Masked words are single tokens of 3+ letters, never adjacent,
    chosen with a generator seeded by ``seed``. Returns ``[(span_ids, mask_positions), ...]``.
    """
    if count <= 0:
        return []
    g = torch.Generator().manual_seed(seed)
    specials = set(int(i) for i in tokenizer.all_special_ids)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    table = word_start_table(vocab, special_tokens=tokenizer.all_special_tokens,
                             scheme=detect_word_scheme(vocab) or "byte_bpe")
    rows = []  # (ids, starts_a_document): row r of every batch, then row r + 1, ...
    for r in range(max((int(b["input_ids"].shape[0]) for b in eval_batches), default=0)):
        for batch in eval_batches:
            if r < batch["input_ids"].shape[0]:
                ids = batch["input_ids"][r].tolist()
                attn = batch.get("attention_mask")
                if attn is not None:  # line by line: the row is one document, then padding
                    ids = ids[: int(attn[r].sum())]
                rows.append((ids, attn is not None))
    examples = []
    for ids, row_is_doc in rows:
        span = _pick_span(tokenizer, ids, row_is_doc, specials, max_tokens, min_tokens)
        if span is None:
            continue
        positions = _pick_words(tokenizer, span, table, 1 + len(examples) % 2, g)
        if positions:
            examples.append((span, positions))
        if len(examples) >= count:
            break
    return examples


def _pick_span(tokenizer, row: list[int], row_is_doc: bool, specials: set[int], max_tokens: int,
               min_tokens: int) -> list[int] | None:
    ends = [tokenizer.decode([t]).rstrip().endswith((".", "!", "?")) for t in row]
    starts = [i for i, t in enumerate(row) if t not in specials and (
        (i == 0 and row_is_doc) or (i > 0 and (row[i - 1] in specials or ends[i - 1])))]
    fallback = None
    for s in starts:
        for e in range(s, min(len(row), s + max_tokens)):
            if row[e] in specials:
                break
            if ends[e]:
                if e + 1 - s >= min_tokens:
                    return row[s: e + 1]
                break
        else:
            if fallback is None and len(row) - s >= max_tokens:
                fallback = row[s: s + max_tokens]
    return fallback


def _pick_words(tokenizer, span: list[int], table: torch.Tensor, n: int, g: torch.Generator) -> list[int]:
    candidates = []
    for p, t in enumerate(span):
        starts_word = p == 0 or bool(table[t])
        nxt = tokenizer.decode([span[p + 1]]) if p + 1 < len(span) else " "
        ends_word = p + 1 == len(span) or bool(table[span[p + 1]]) or not nxt[:1].isalnum()
        word = tokenizer.decode([t]).strip()
        if starts_word and ends_word and len(word) >= 3 and word.isalpha():
            candidates.append(p)
    chosen: list[int] = []
    for i in torch.randperm(len(candidates), generator=g).tolist():
        p = candidates[i]
        if all(abs(p - q) > 1 for q in chosen):
            chosen.append(p)
        if len(chosen) == n:
            break
    return sorted(chosen)
