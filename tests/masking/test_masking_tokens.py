"""Token, whole-word and span masks: statistics, eligibility, determinism, errors."""

import math

import pytest
import torch

from lmssl.masking import (
    bernoulli_token_mask,
    eligible_positions,
    expected_span_length,
    sample_span_lengths,
    span_mask,
    whole_word_mask,
    word_start_table,
    word_starts_from_tokens,
)

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIALS = (PAD, CLS, SEP, MASK)
VOCAB = 500


def make_batch(batch=256, length=512, seed=0):
    """`(B, T)` ids framed by CLS ... SEP then PAD; half the rows are padded. Returns ids, attention_mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), VOCAB, (batch, length), generator=g)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=g)
    lengths[::2] = length  # every other row is full
    attention = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    ids[~attention] = PAD
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    return ids, attention.long()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- bernoulli_token_mask


def test_bernoulli_rate_on_100k_positions():
    ids, attention = make_batch()
    eligible = eligible_positions(ids, SPECIALS, attention)
    assert int(eligible.sum()) > 100_000
    mask = bernoulli_token_mask(ids, 0.15, gen(0), SPECIALS, attention)
    assert mask.shape == ids.shape and mask.dtype == torch.bool
    fraction = mask.sum().item() / eligible.sum().item()
    assert abs(fraction - 0.15) < 0.005, fraction


@pytest.mark.parametrize("rate", [0.05, 0.4])
def test_bernoulli_other_rates(rate):
    ids, attention = make_batch(batch=100)
    eligible = eligible_positions(ids, SPECIALS, attention)
    mask = bernoulli_token_mask(ids, rate, gen(1), SPECIALS, attention)
    assert abs(mask.sum().item() / eligible.sum().item() - rate) < 0.006


def test_bernoulli_never_chooses_special_or_pad():
    ids, attention = make_batch()
    mask = bernoulli_token_mask(ids, 0.5, gen(2), SPECIALS, attention)
    assert not torch.isin(ids[mask], torch.tensor(SPECIALS)).any()
    assert not mask[attention == 0].any()


def test_attention_mask_excludes_non_special_ids():
    # Positions beyond attention_mask hold ordinary ids here: they must still never be chosen.
    ids = torch.randint(10, 50, (64, 32), generator=gen(3))
    attention = torch.zeros(64, 32, dtype=torch.long)
    attention[:, :5] = 1
    mask = bernoulli_token_mask(ids, 0.9, gen(4), SPECIALS, attention)
    assert mask[:, :5].any() and not mask[:, 5:].any()


def test_bernoulli_at_least_one_per_row_with_eligible_tokens():
    ids = torch.full((300, 20), PAD)
    ids[:, 0] = CLS
    ids[:, 1:4] = 7  # three eligible tokens per row
    ids[:, 4] = SEP
    ids[-1, 1:4] = PAD  # last row: nothing eligible
    mask = bernoulli_token_mask(ids, 0.01, gen(5), SPECIALS)
    assert bool(mask[:-1].any(dim=1).all())
    assert not mask[-1].any()
    # the forced choice is spread over the eligible positions, not always the first one
    assert bool(mask[:, 1:4].any(dim=0).all())
    off = bernoulli_token_mask(ids, 0.01, gen(5), SPECIALS, at_least_one=False)
    assert off.any(dim=1).sum() < 50


def test_bernoulli_deterministic_per_seed_and_leaves_global_rng_alone():
    ids, attention = make_batch(batch=20)
    state = torch.get_rng_state()
    a = bernoulli_token_mask(ids, 0.15, gen(7), SPECIALS, attention)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # global seed must not matter
    b = bernoulli_token_mask(ids, 0.15, gen(7), SPECIALS, attention)
    c = bernoulli_token_mask(ids, 0.15, gen(8), SPECIALS, attention)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_special_ids_as_tensor_and_int32_ids():
    ids, attention = make_batch(batch=8, length=64)
    a = bernoulli_token_mask(ids, 0.3, gen(9), torch.tensor(SPECIALS), attention)
    b = bernoulli_token_mask(ids.int(), 0.3, gen(9), SPECIALS, attention.bool())
    assert torch.equal(a, b)


# ---------------------------------------------------------------- whole_word_mask


def reference_word_ids(word_starts, eligible):
    """Word id per position (python loop, independent of the implementation); -1 if ineligible."""
    out = []
    for starts_row, eligible_row in zip(word_starts.tolist(), eligible.tolist()):
        ids, current, previous_eligible = [], -1, False
        for start, ok in zip(starts_row, eligible_row):
            if ok and (start or not previous_eligible):
                current += 1
            ids.append(current if ok else -1)
            previous_eligible = ok
        out.append(ids)
    return torch.tensor(out)


def test_whole_word_never_splits_a_word_and_hits_the_rate():
    ids, attention = make_batch()
    word_starts = torch.rand(ids.shape, generator=gen(10)) < 0.5  # mean word length 2
    word_starts[:, 1] = False  # a continuation right after CLS still starts a word
    mask = whole_word_mask(ids, word_starts, 0.15, gen(11), SPECIALS, attention)
    eligible = eligible_positions(ids, SPECIALS, attention)
    assert not mask[~eligible].any()

    words = reference_word_ids(word_starts, eligible)
    offset = (words.max(dim=1).values + 1).cumsum(0) - (words.max(dim=1).values + 1)
    flat = (words + offset.unsqueeze(1))[eligible]  # global word id of every eligible token
    n_words = int(flat.max()) + 1
    size = torch.bincount(flat, minlength=n_words)
    hit = torch.bincount(flat, weights=mask[eligible].double(), minlength=n_words)
    assert torch.all((hit == 0) | (hit == size)), "a word was partly masked"

    word_fraction = (hit > 0).double().mean().item()
    token_fraction = mask.sum().item() / eligible.sum().item()
    assert n_words > 30_000
    assert abs(word_fraction - 0.15) < 0.006, word_fraction
    assert abs(token_fraction - 0.15) < 0.008, token_fraction


def test_whole_word_does_not_cross_special_tokens_and_at_least_one():
    ids = torch.tensor([[CLS, 10, 11, SEP, 12, 13, SEP, PAD]] * 400)
    word_starts = torch.zeros_like(ids, dtype=torch.bool)  # the table says: no word starts at all
    mask = whole_word_mask(ids, word_starts, 0.3, gen(12), SPECIALS)
    # words are {1,2} and {4,5}: never one of them without the other, never across SEP
    assert torch.equal(mask[:, 1], mask[:, 2]) and torch.equal(mask[:, 4], mask[:, 5])
    assert bool(mask.any(dim=1).all())
    both = (mask[:, 1] & mask[:, 4]).double().mean().item()
    assert 0.03 < both < 0.2  # the two words are chosen independently (0.3 * 0.3 = 0.09)


def test_whole_word_deterministic():
    ids, attention = make_batch(batch=16)
    starts = torch.rand(ids.shape, generator=gen(13)) < 0.4
    a = whole_word_mask(ids, starts, 0.15, gen(14), SPECIALS, attention)
    b = whole_word_mask(ids, starts, 0.15, gen(14), SPECIALS, attention)
    c = whole_word_mask(ids, starts, 0.15, gen(15), SPECIALS, attention)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_word_start_table_and_tokens_agree_for_byte_bpe():
    vocab = ["<pad>", "<s>", "</s>", "<mask>", "Hello", "Ġwor", "ld", ",", "Ġhow", "Ġare", "Ġyou", "?"]
    specials = ["<pad>", "<s>", "</s>", "<mask>"]
    table = word_start_table(vocab, special_tokens=specials)
    assert table.tolist() == [True, True, True, True, False, True, False, False, True, True, True, False]
    rows = [
        ["<s>", "Hello", "Ġwor", "ld", ",", "Ġhow", "</s>"],
        ["ld", "Ġare", "Ġyou", "?", "</s>", "<pad>", "<pad>"],
    ]
    starts = word_starts_from_tokens(rows, special_tokens=specials)
    assert starts.tolist() == [
        [True, True, True, False, False, True, True],
        [True, True, True, False, True, True, True],
    ]
    ids = torch.tensor([[vocab.index(t) for t in row] for row in rows])
    fast = table[ids]
    # The table cannot know positions; whole_word_mask adds "first token / after a special" itself,
    # so both give the same masks.
    for seed in range(5):
        a = whole_word_mask(ids, fast, 0.5, gen(seed), [0, 1, 2, 3])
        b = whole_word_mask(ids, starts, 0.5, gen(seed), [0, 1, 2, 3])
        assert torch.equal(a, b)


def test_word_start_table_schemes_and_mapping():
    wordpiece = {"[PAD]": 0, "[CLS]": 1, "play": 2, "##ing": 3, "##s": 4, "the": 5}
    table = word_start_table(wordpiece, special_tokens=["[PAD]", "[CLS]"], scheme="wordpiece")
    assert table.tolist() == [True, True, True, False, False, True]
    sp = word_start_table(["<unk>", "\u2581the", "re", "\u2581cat"], special_tokens=["<unk>"], scheme="sentencepiece")
    assert sp.tolist() == [True, True, False, True]


# ---------------------------------------------------------------- span_mask


def runs_of_true(mask):
    """Lengths of maximal runs of True in each row of a (B, T) bool tensor."""
    lengths = []
    for row in mask.tolist():
        run = 0
        for value in row + [False]:
            if value:
                run += 1
            elif run:
                lengths.append(run)
                run = 0
    return lengths


def truncated_geometric_mean(p, max_span):
    probabilities = [p * (1 - p) ** (k - 1) for k in range(1, max_span + 1)]
    return sum(k * q for k, q in enumerate(probabilities, 1)) / sum(probabilities)


def test_span_lengths_follow_truncated_geometric():
    lengths = sample_span_lengths(200_000, gen(20))
    expected = truncated_geometric_mean(0.2, 10)  # about 3.80
    assert abs(expected_span_length(0.2, 10) - expected) < 1e-12
    assert abs(lengths.double().mean().item() - expected) < 0.03
    assert int(lengths.min()) == 1 and int(lengths.max()) == 10
    p1 = (lengths == 1).double().mean().item()
    assert abs(p1 - 0.2 / (1 - 0.8**10)) < 0.005
    other = sample_span_lengths(100_000, gen(21), p=0.5, max_span=4)
    assert abs(other.double().mean().item() - truncated_geometric_mean(0.5, 4)) < 0.02
    assert int(other.max()) == 4


def test_span_mask_budget_eligibility_and_run_lengths():
    ids, attention = make_batch()
    eligible = eligible_positions(ids, SPECIALS, attention)
    mask = span_mask(ids, 0.15, gen(22), SPECIALS, attention)
    assert not mask[~eligible].any()
    budget = torch.round(eligible.sum(dim=1).double() * 0.15).long().clamp(min=1)
    assert torch.equal(mask.sum(dim=1), budget)  # exact per row
    assert abs(mask.sum().item() / eligible.sum().item() - 0.15) < 0.005

    runs = torch.tensor(runs_of_true(mask), dtype=torch.double)
    # Runs are spans, shortened by budget/borders or merged with a neighbour now and then.
    assert 3.4 < runs.mean().item() < 4.6, runs.mean().item()


def test_span_mask_run_lengths_match_the_geometric_mean_when_sparse():
    # Long rows and a low rate: only the last span of a row is cut by the budget and merges are
    # rare, so the mean run length is the configured mean (~3.80 for p=0.2, max 10).
    ids = torch.randint(len(SPECIALS), VOCAB, (20, 4096), generator=gen(23))
    mask = span_mask(ids, 0.05, gen(24), SPECIALS)
    runs = torch.tensor(runs_of_true(mask), dtype=torch.double)
    assert len(runs) > 800
    assert abs(runs.mean().item() - truncated_geometric_mean(0.2, 10)) < 0.25, runs.mean().item()
    short = span_mask(ids, 0.05, gen(24), SPECIALS, p=0.5, max_span=3)
    short_runs = torch.tensor(runs_of_true(short), dtype=torch.double)
    assert abs(short_runs.mean().item() - truncated_geometric_mean(0.5, 3)) < 0.15, short_runs.mean().item()


def test_span_mask_configurable_and_deterministic():
    ids, attention = make_batch(batch=50)
    ones = span_mask(ids, 0.15, gen(24), SPECIALS, attention, p=0.99, max_span=1)
    singles = torch.tensor(runs_of_true(ones), dtype=torch.double)
    assert singles.mean().item() < 1.3  # length-1 spans only touch by chance (about 15% of neighbours)
    a = span_mask(ids, 0.15, gen(25), SPECIALS, attention)
    b = span_mask(ids, 0.15, gen(25), SPECIALS, attention)
    c = span_mask(ids, 0.15, gen(26), SPECIALS, attention)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_span_mask_never_crosses_special_tokens():
    ids = torch.tensor([[CLS, 5, SEP, 6, SEP, 7, 8, SEP]] * 200)
    mask = span_mask(ids, 0.5, gen(27), SPECIALS)
    assert not torch.isin(ids[mask], torch.tensor(SPECIALS)).any()
    assert torch.equal(mask.sum(dim=1), torch.full((200,), 2))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("rate", [0.0, 1.0, 1.5, -0.1])
def test_bad_rate_raises(rate):
    ids, _ = make_batch(batch=2, length=8)
    for call in (
        lambda: bernoulli_token_mask(ids, rate, gen(0), SPECIALS),
        lambda: whole_word_mask(ids, torch.ones_like(ids, dtype=torch.bool), rate, gen(0), SPECIALS),
        lambda: span_mask(ids, rate, gen(0), SPECIALS),
    ):
        with pytest.raises(ValueError, match="rate must be in the open interval"):
            call()


def test_bad_shapes_and_arguments_raise():
    ids, attention = make_batch(batch=2, length=8)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\)"):
        bernoulli_token_mask(ids[0], 0.15, gen(0), SPECIALS)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        bernoulli_token_mask(ids, 0.15, gen(0), SPECIALS, attention[:, :4])
    with pytest.raises(ValueError, match="integer token ids"):
        bernoulli_token_mask(ids.float(), 0.15, gen(0), SPECIALS)
    with pytest.raises(ValueError, match="word_starts has shape"):
        whole_word_mask(ids, torch.ones(2, 4, dtype=torch.bool), 0.15, gen(0), SPECIALS)
    with pytest.raises(TypeError, match="torch.Generator"):
        bernoulli_token_mask(ids, 0.15, None, SPECIALS)
    with pytest.raises(ValueError, match="max_span"):
        span_mask(ids, 0.15, gen(0), SPECIALS, max_span=0)
    with pytest.raises(ValueError, match="p must be"):
        sample_span_lengths(3, gen(0), p=1.0)
    with pytest.raises(ValueError, match="scheme"):
        word_start_table(["a"], scheme="bpe")
    with pytest.raises(ValueError, match="same length"):
        word_starts_from_tokens([["a", "b"], ["c"]])
    assert math.isclose(expected_span_length(0.5, 1), 1.0)
