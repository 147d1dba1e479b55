"""mlm_corrupt: the 80/10/10 split, labels, random replacements, determinism, errors."""

import pytest
import torch

from lmssl.masking import IGNORE_INDEX, bernoulli_token_mask, mlm_corrupt

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIALS = (PAD, CLS, SEP, MASK, UNK)
VOCAB = 64  # small on purpose: a random draw hitting a special id would be frequent if allowed


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_batch(batch=256, length=512, seed=0):
    g = gen(seed)
    ids = torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=g)
    ids[:, 0] = CLS
    ids[:, -1] = SEP
    ids[::3, length // 2 :] = PAD
    return ids


def corrupt(ids, mask, seed, **kwargs):
    return mlm_corrupt(ids, mask, gen(seed), mask_token_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, **kwargs)


def split(ids, corrupted, mask):
    """Fractions of chosen positions that became [MASK], another token, or stayed unchanged."""
    n = mask.sum().item()
    to_mask = (corrupted[mask] == MASK).sum().item() / n
    changed = ((corrupted[mask] != MASK) & (corrupted[mask] != ids[mask])).sum().item() / n
    same = (corrupted[mask] == ids[mask]).sum().item() / n
    return to_mask, changed, same


def test_80_10_10_split_on_100k_positions():
    ids = make_batch()
    mask = bernoulli_token_mask(ids, 0.15, gen(1), SPECIALS)
    assert mask.sum() > 15_000
    corrupted, labels = corrupt(ids, mask, 2)
    to_mask, changed, same = split(ids, corrupted, mask)
    # "changed" misses random draws that equal the original id: 0.1 / 59 candidates ~ 0.0017
    assert abs(to_mask - 0.8) < 0.01, to_mask
    assert abs(changed - 0.1 * (1 - 1 / 59)) < 0.01, changed
    assert abs(same - (0.1 + 0.1 / 59)) < 0.01, same


def test_random_replacements_are_never_special_and_cover_the_vocabulary():
    ids = make_batch()
    mask = bernoulli_token_mask(ids, 0.5, gen(3), SPECIALS)
    corrupted, _ = corrupt(ids, mask, 4, mask_prob=0.0, random_prob=1.0)
    planted = corrupted[mask]
    assert not torch.isin(planted, torch.tensor(SPECIALS)).any()
    counts = torch.bincount(planted, minlength=VOCAB)[len(SPECIALS) :].double()
    assert bool((counts > 0).all())  # every non-special id is drawn
    expected = counts.mean()
    assert ((counts - expected).abs() / expected).max() < 0.1  # and roughly uniformly


def test_labels_and_untouched_positions():
    ids = make_batch(batch=50)
    before = ids.clone()
    mask = bernoulli_token_mask(ids, 0.15, gen(5), SPECIALS)
    corrupted, labels = corrupt(ids, mask, 6)
    assert torch.equal(ids, before), "input_ids was modified in place"
    assert labels.dtype == torch.long and labels.shape == ids.shape
    assert torch.equal(labels[mask], ids[mask])
    assert bool((labels[~mask] == IGNORE_INDEX).all())
    assert torch.equal(corrupted[~mask], ids[~mask])


def test_rates_are_configurable():
    ids = make_batch(batch=100)
    mask = bernoulli_token_mask(ids, 0.3, gen(7), SPECIALS)
    all_mask, _ = corrupt(ids, mask, 8, mask_prob=1.0, random_prob=0.0)
    assert bool((all_mask[mask] == MASK).all())
    half, _ = corrupt(ids, mask, 9, mask_prob=0.5, random_prob=0.2)
    to_mask, changed, same = split(ids, half, mask)
    assert abs(to_mask - 0.5) < 0.015 and abs(changed - 0.2 * (1 - 1 / 59)) < 0.015 and abs(same - 0.3) < 0.015
    keep_all, _ = corrupt(ids, mask, 10, mask_prob=0.0, random_prob=0.0)
    assert torch.equal(keep_all, ids)


def test_deterministic_per_seed_and_global_rng_untouched():
    ids = make_batch(batch=20)
    mask = bernoulli_token_mask(ids, 0.15, gen(11), SPECIALS)
    state = torch.get_rng_state()
    a, la = corrupt(ids, mask, 12)
    assert torch.equal(torch.get_rng_state(), state)
    b, lb = corrupt(ids, mask, 12)
    c, _ = corrupt(ids, mask, 13)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_errors():
    ids = make_batch(batch=2, length=8)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask_prob \\+ random_prob must be <= 1"):
        corrupt(ids, mask, 0, mask_prob=0.8, random_prob=0.3)
    with pytest.raises(ValueError, match="mask_prob must be in \\[0, 1\\]"):
        corrupt(ids, mask, 0, mask_prob=1.2)
    with pytest.raises(ValueError, match="mask must have dtype torch.bool"):
        corrupt(ids, mask.long(), 0)
    with pytest.raises(ValueError, match="mask has shape"):
        corrupt(ids, mask[:, :4], 0)
    with pytest.raises(ValueError, match="mask_token_id=99 is outside"):
        mlm_corrupt(ids, mask, gen(0), mask_token_id=99, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="no non-special ids"):
        mlm_corrupt(ids, mask, gen(0), mask_token_id=MASK, vocab_size=5, special_ids=SPECIALS)
    with pytest.raises(TypeError, match="torch.Generator"):
        mlm_corrupt(ids, mask, 0, mask_token_id=MASK, vocab_size=VOCAB)
