"""BERT's corruption of chosen positions: [MASK] / random token / unchanged, plus labels."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lmssl.masking._common import (
    check_2d,
    check_closed_unit,
    check_generator,
    check_same_shape,
    ids_tensor,
    randint,
    uniform,
)

IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips by default


def mlm_corrupt(
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Iterable[int] | torch.Tensor = (),
    mask_prob: float = 0.8,
    random_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the chosen positions of a batch for masked-language modelling.

    Each position where `mask` is True independently becomes `mask_token_id` with prob
    `mask_prob`, a random token with prob `random_prob`, and stays unchanged otherwise
    (BERT: 0.8 / 0.1 / 0.1). Random tokens are drawn uniformly from the ids in
    `[0, vocab_size)` that are neither in `special_ids` nor `mask_token_id`, so a pad,
    cls or mask token is never planted as noise. `input_ids` is not modified.

    Args:
        input_ids: `(B, T)` integer token ids.
        mask: `(B, T)` bool, True at the positions to predict (from `bernoulli_token_mask`,
            `whole_word_mask` or `span_mask`).
        generator: the source of every random draw.
        mask_token_id: id written at masked positions.
        vocab_size: number of token ids; random replacements are drawn below it.
        special_ids: ids never drawn as random replacements.
        mask_prob: probability a chosen position becomes `mask_token_id`.
        random_prob: probability a chosen position becomes a random non-special id.

    Returns:
        corrupted_ids: `(B, T)` long, a new tensor.
        labels: `(B, T)` long, the original id where `mask` is True and -100 elsewhere.
    """
    check_generator(generator)
    check_2d("input_ids", input_ids)
    check_2d("mask", mask, dtype=torch.bool)
    check_same_shape("mask", mask, "input_ids", input_ids)
    mask_prob = check_closed_unit("mask_prob", mask_prob)
    random_prob = check_closed_unit("random_prob", random_prob)
    if mask_prob + random_prob > 1.0 + 1e-9:
        raise ValueError(
            f"mask_prob + random_prob must be <= 1 (the rest stays unchanged), got {mask_prob} + {random_prob}"
        )
    vocab_size = int(vocab_size)
    if not 0 <= int(mask_token_id) < vocab_size:
        raise ValueError(f"mask_token_id={mask_token_id} is outside the vocabulary [0, {vocab_size})")

    device = input_ids.device
    mask = mask.to(device)
    excluded = torch.cat([ids_tensor(special_ids, device), torch.tensor([int(mask_token_id)], device=device)])
    candidates = torch.arange(vocab_size, device=device)
    candidates = candidates[~torch.isin(candidates, excluded)]  # (V',) ids allowed as random noise
    if random_prob > 0 and candidates.numel() == 0:
        raise ValueError(f"no non-special ids in [0, {vocab_size}) to draw random replacements from")

    noise = uniform(tuple(input_ids.shape), generator, device)  # (B, T)
    to_mask = mask & (noise < mask_prob)
    to_random = mask & (noise >= mask_prob) & (noise < mask_prob + random_prob)

    corrupted = input_ids.clone()
    corrupted[to_mask] = int(mask_token_id)
    n_random = int(to_random.sum())
    if n_random:
        picks = randint(candidates.numel(), (n_random,), generator, device)  # (N_random,)
        corrupted[to_random] = candidates[picks].to(corrupted.dtype)

    labels = torch.full_like(input_ids, IGNORE_INDEX, dtype=torch.long)
    labels[mask] = input_ids[mask].long()
    return corrupted, labels
