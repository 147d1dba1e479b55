"""Which token positions to hide: per-token, whole-word and span masks over (B, T) ids.

All functions here return a `(B, T)` bool mask, True at the positions an objective
hides (and predicts). What to put at those positions is `mlm.mlm_corrupt`'s job.

Eligibility is the same everywhere: a position can be chosen only if its id is not in
`special_ids` and, when an `attention_mask` is given, its attention_mask is non-zero.
Pass the tokenizer's special ids (pad, cls/bos, sep/eos, mask, unk if wanted) as
`special_ids`, e.g. `tokenizer.all_special_ids`.

Word boundaries for whole-word masking come from a `(B, T)` bool tensor `word_starts`
(True at the first piece of a word). The fast way to build it is a per-vocabulary
table: `table = word_start_table(tokenizer.convert_ids_to_tokens(range(len(tokenizer))),
special_tokens=tokenizer.all_special_tokens)` once, then `word_starts = table[input_ids]`
per batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch

from lmssl.masking._common import (
    check_2d,
    check_generator,
    check_open_unit,
    check_same_shape,
    ids_tensor,
    uniform,
)

WordScheme = Literal["byte_bpe", "sentencepiece", "wordpiece"]

# How each tokenizer family marks word boundaries inside a token string.
_START_PREFIX = {"byte_bpe": "\u0120", "sentencepiece": "\u2581"}  # "Ġ" (GPT-2/RoBERTa), "▁" (T5/Llama)
_CONTINUATION_PREFIX = {"wordpiece": "##"}  # BERT


def eligible_positions(
    input_ids: torch.Tensor,
    special_ids: Iterable[int] | torch.Tensor = (),
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions that may be masked: not a special id and not padding.

    Args:
        input_ids: `(B, T)` integer token ids.
        special_ids: ids that are never chosen (pad, cls, sep, mask, ...).
        attention_mask: optional `(B, T)`; positions where it is 0 are never chosen.

    Returns:
        `(B, T)` bool, True where a position may be chosen.
    """
    check_2d("input_ids", input_ids)
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    specials = ids_tensor(special_ids, input_ids.device)
    eligible = ~torch.isin(input_ids, specials) if specials.numel() else torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        check_2d("attention_mask", attention_mask)
        check_same_shape("attention_mask", attention_mask, "input_ids", input_ids)
        eligible &= attention_mask.to(input_ids.device) != 0
    return eligible


def _ensure_one_per_row(chosen: torch.Tensor, candidates: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Add one candidate to every row of `chosen` (B, T) that has candidates but no choice.

    The added position is the candidate with the smallest `noise` (B, T), so it is uniform
    over the row's candidates and costs no extra random draws.
    """
    needs = candidates.any(dim=1) & ~chosen.any(dim=1)  # (B,)
    key = torch.where(candidates, noise, torch.full_like(noise, 2.0))  # noise < 1 on candidates
    pick = key.argmin(dim=1, keepdim=True)  # (B, 1)
    fix = torch.zeros_like(chosen).scatter_(1, pick, needs.unsqueeze(1))
    return chosen | fix


def bernoulli_token_mask(
    input_ids: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    special_ids: Iterable[int] | torch.Tensor = (),
    attention_mask: torch.Tensor | None = None,
    *,
    at_least_one: bool = True,
) -> torch.Tensor:
    """BERT-style token mask: each eligible position is chosen independently with prob `rate`.

    Args:
        input_ids: `(B, T)` integer token ids.
        rate: probability of choosing an eligible position, in (0, 1); BERT uses 0.15.
        generator: the source of every random draw.
        special_ids: ids that are never chosen (see `eligible_positions`).
        attention_mask: optional `(B, T)`; positions where it is 0 are never chosen.
        at_least_one: if True, a row that has eligible positions but drew none gets one
            uniformly chosen eligible position, so every such sequence has a target.

    Returns:
        `(B, T)` bool mask, True at chosen positions.
    """
    check_generator(generator)
    rate = check_open_unit("rate", rate)
    eligible = eligible_positions(input_ids, special_ids, attention_mask)
    noise = uniform(tuple(input_ids.shape), generator, input_ids.device)  # (B, T)
    chosen = eligible & (noise < rate)
    if at_least_one:
        chosen = _ensure_one_per_row(chosen, eligible, noise)
    return chosen


def whole_word_mask(
    input_ids: torch.Tensor,
    word_starts: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    special_ids: Iterable[int] | torch.Tensor = (),
    attention_mask: torch.Tensor | None = None,
    *,
    at_least_one: bool = True,
) -> torch.Tensor:
    """Whole-word mask: each word is chosen with prob `rate`, and all its pieces are masked.

    A word is an eligible position flagged in `word_starts` plus the eligible positions
    that follow it up to the next flagged or ineligible position. The first position of
    a row and the first eligible position after a special or pad token always start a
    word, so a word never crosses a special token. Because every word is chosen
    independently with prob `rate`, the expected fraction of masked eligible tokens is
    also `rate`.

    Args:
        input_ids: `(B, T)` integer token ids.
        word_starts: `(B, T)` bool, True at the first piece of each word
            (e.g. `word_start_table(...)[input_ids]`).
        rate: probability of choosing a word, in (0, 1).
        generator: the source of every random draw.
        special_ids: ids that are never chosen (see `eligible_positions`).
        attention_mask: optional `(B, T)`; positions where it is 0 are never chosen.
        at_least_one: if True, a row with eligible words but none drawn gets one word.

    Returns:
        `(B, T)` bool mask; every word is either fully True or fully False.
    """
    check_generator(generator)
    rate = check_open_unit("rate", rate)
    eligible = eligible_positions(input_ids, special_ids, attention_mask)  # (B, T)
    check_2d("word_starts", word_starts)
    check_same_shape("word_starts", word_starts, "input_ids", input_ids)
    B, T = input_ids.shape

    prev_eligible = torch.zeros_like(eligible)
    prev_eligible[:, 1:] = eligible[:, :-1]
    starts = eligible & (word_starts.to(eligible.device).bool() | ~prev_eligible)  # (B, T)

    # owner[b, t] = position of the word start that position t belongs to (-1 before any start).
    positions = torch.arange(T, device=input_ids.device).expand(B, T)
    owner = torch.where(starts, positions, torch.full_like(positions, -1)).cummax(dim=1).values  # (B, T)

    noise = uniform((B, T), generator, input_ids.device)  # one draw per position, read at word starts
    chosen_starts = starts & (noise < rate)
    if at_least_one:
        chosen_starts = _ensure_one_per_row(chosen_starts, starts, noise)
    return eligible & chosen_starts.gather(1, owner.clamp(min=0))


def expected_span_length(p: float = 0.2, max_span: int = 10) -> float:
    """Mean of the truncated geometric span length used by `span_mask`.

    P(len = k) is proportional to p * (1 - p)**(k - 1) for k = 1..max_span (SpanBERT's
    distribution; p=0.2, max_span=10 gives about 3.8).
    """
    p = check_open_unit("p", p)
    if int(max_span) < 1:
        raise ValueError(f"max_span must be >= 1, got {max_span}")
    weights = [p * (1 - p) ** (k - 1) for k in range(1, int(max_span) + 1)]
    return sum(k * w for k, w in enumerate(weights, start=1)) / sum(weights)


def sample_span_lengths(
    n: int,
    generator: torch.Generator,
    *,
    p: float = 0.2,
    max_span: int = 10,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw `n` span lengths from the geometric(p) distribution truncated to 1..max_span.

    Sampled by inverting the truncated CDF, one uniform draw per length.

    Returns:
        `(n,)` long tensor with values in [1, max_span].
    """
    check_generator(generator)
    p = check_open_unit("p", p)
    max_span = int(max_span)
    if max_span < 1:
        raise ValueError(f"max_span must be >= 1, got {max_span}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    u = uniform((n,), generator, device).double()  # (n,)
    covered = 1.0 - (1.0 - p) ** max_span  # probability mass of 1..max_span before truncation
    lengths = torch.ceil(torch.log1p(-u * covered) / math.log1p(-p))
    return lengths.clamp(1, max_span).long()


def span_mask(
    input_ids: torch.Tensor,
    rate: float,
    generator: torch.Generator,
    special_ids: Iterable[int] | torch.Tensor = (),
    attention_mask: torch.Tensor | None = None,
    *,
    p: float = 0.2,
    max_span: int = 10,
) -> torch.Tensor:
    """SpanBERT-style mask: contiguous spans of geometric length until `rate` is covered.

    Each row gets a budget of `round(rate * n_eligible)` positions (at least 1 when the
    row has any eligible position). Spans are placed one per row per round: a start
    drawn uniformly among eligible, not yet masked positions, and a length drawn by
    `sample_span_lengths(p, max_span)` (mean `expected_span_length(p, max_span)`). A span
    stops early at a special/pad token, an already-masked token, the end of the row, or
    when the budget is used up, so every row masks exactly its budget. Two spans may
    touch and then read as one longer run. The loop runs one round per span (about
    `rate * T / mean_length` rounds), so it suits the data-loading side.

    Args:
        input_ids: `(B, T)` integer token ids.
        rate: fraction of eligible positions to cover, in (0, 1); SpanBERT uses 0.15.
        generator: the source of every random draw.
        special_ids: ids that are never chosen (see `eligible_positions`).
        attention_mask: optional `(B, T)`; positions where it is 0 are never chosen.
        p: geometric parameter of span lengths (SpanBERT: 0.2).
        max_span: longest span (SpanBERT: 10).

    Returns:
        `(B, T)` bool mask with exactly `round(rate * n_eligible)` True per row.
    """
    check_generator(generator)
    rate = check_open_unit("rate", rate)
    p = check_open_unit("p", p)
    if int(max_span) < 1:
        raise ValueError(f"max_span must be >= 1, got {max_span}")
    max_span = int(max_span)
    eligible = eligible_positions(input_ids, special_ids, attention_mask)  # (B, T)
    B, T = eligible.shape
    device = eligible.device

    n_eligible = eligible.sum(dim=1)  # (B,)
    budget = torch.round(n_eligible.double() * rate).long()
    budget = torch.where(n_eligible > 0, budget.clamp(min=1), budget)  # (B,)

    offsets = torch.arange(max_span, device=device)  # (M,)
    mask = torch.zeros_like(eligible)
    while True:
        need = budget - mask.sum(dim=1)  # (B,)
        free = eligible & ~mask  # (B, T)
        active = (need > 0) & free.any(dim=1)
        if not bool(active.any()):
            break
        noise = uniform((B, T), generator, device)
        start = torch.where(free, noise, torch.full_like(noise, -1.0)).argmax(dim=1)  # (B,)
        length = sample_span_lengths(B, generator, p=p, max_span=max_span, device=device)
        length = torch.where(active, torch.minimum(length, need), torch.zeros_like(length))  # (B,)

        pos = start.unsqueeze(1) + offsets  # (B, M)
        in_row = pos < T
        pos = pos.clamp(max=T - 1)
        ok = free.gather(1, pos) & in_row & (offsets < length.unsqueeze(1))  # (B, M)
        run = ok.long().cumprod(dim=1)  # stop at the first position that is not ok
        mask |= torch.zeros((B, T), dtype=torch.long, device=device).scatter_add_(1, pos, run) > 0
    return mask


def _piece_starts_word(token: str | None, scheme: WordScheme, special_tokens: frozenset[str]) -> bool:
    if token is None:
        return False
    if token in special_tokens:
        return True
    if scheme in _CONTINUATION_PREFIX:
        return not token.startswith(_CONTINUATION_PREFIX[scheme])
    return token.startswith(_START_PREFIX[scheme])


def _check_scheme(scheme: str) -> None:
    known = (*_START_PREFIX, *_CONTINUATION_PREFIX)
    if scheme not in known:
        raise ValueError(f"scheme must be one of {known}, got {scheme!r}")


def word_start_table(
    vocab: Sequence[str | None] | Mapping[str, int],
    *,
    special_tokens: Iterable[str] = (),
    scheme: WordScheme = "byte_bpe",
) -> torch.Tensor:
    """Per-vocabulary table of which token ids begin a word; `table[input_ids]` gives word_starts.

    Args:
        vocab: the token string of every id (`tokenizer.convert_ids_to_tokens(range(len(tokenizer)))`),
            or a `{token: id}` mapping (`tokenizer.get_vocab()`).
        special_tokens: token strings that are words on their own (`tokenizer.all_special_tokens`).
        scheme: how pieces mark words: "byte_bpe" (GPT-2/RoBERTa, a word starts with "Ġ"),
            "sentencepiece" (a word starts with "▁"), "wordpiece" (BERT, a continuation
            starts with "##").

    Returns:
        `(V,)` bool tensor, True for ids whose token starts a word.

    Byte-level BPE puts no "Ġ" on punctuation or on a word at the very start of a text,
    so "hello," is one word; `whole_word_mask` treats the first token of a row and the
    first token after a special token as word starts, which covers text starts.
    """
    _check_scheme(scheme)
    if isinstance(vocab, Mapping):
        size = max(vocab.values(), default=-1) + 1
        id_to_token: list[str | None] = [None] * size
        for token, index in vocab.items():
            id_to_token[index] = token
    else:
        id_to_token = list(vocab)
    specials = frozenset(special_tokens)
    return torch.tensor([_piece_starts_word(t, scheme, specials) for t in id_to_token], dtype=torch.bool)


def word_starts_from_tokens(
    tokens: Sequence[Sequence[str]],
    *,
    special_tokens: Iterable[str] = (),
    scheme: WordScheme = "byte_bpe",
) -> torch.Tensor:
    """Word starts from token strings (the slow path; see `word_start_table` for the fast one).

    A token starts a word if its string says so (see `word_start_table`'s `scheme`), if it
    is the first token of its row, if it is a special token, or if it follows one.

    Args:
        tokens: B rows of T token strings each (pad rows to equal length first).

    Returns:
        `(B, T)` bool tensor.
    """
    _check_scheme(scheme)
    lengths = {len(row) for row in tokens}
    if len(lengths) > 1:
        raise ValueError(
            f"all rows of tokens must have the same length (pad them first), got lengths {sorted(lengths)}"
        )
    specials = frozenset(special_tokens)
    rows = []
    for row in tokens:
        flags = []
        for i, token in enumerate(row):
            after_special = i > 0 and row[i - 1] in specials
            flags.append(i == 0 or after_special or _piece_starts_word(token, scheme, specials))
        rows.append(flags)
    width = lengths.pop() if lengths else 0
    return torch.tensor(rows, dtype=torch.bool).reshape(len(rows), width)
