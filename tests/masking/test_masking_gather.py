"""gather / scatter / restore / select helpers, against plain loops and boolean indexing."""

import pytest
import torch

from lmssl.masking import (
    bernoulli_token_mask,
    gather_tokens,
    mask_to_indices,
    masked_positions,
    random_keep,
    restore_order,
    scatter_tokens,
    select_masked,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("trailing", [(), (5,), (3, 2)])
def test_gather_tokens_matches_a_loop(trailing):
    B, L, K = 3, 9, 4
    x = torch.randn(B, L, *trailing, generator=gen(0))
    idx = torch.stack([torch.randperm(L, generator=gen(b))[:K] for b in range(B)])
    out = gather_tokens(x, idx)
    assert out.shape == (B, K, *trailing)
    for b in range(B):
        for k in range(K):
            assert torch.equal(out[b, k], x[b, idx[b, k]])


def test_scatter_then_gather_round_trips_and_fill_gets_gradients():
    B, L, D = 2, 10, 4
    keep_idx, mask, _ = random_keep(B, L, gen(1), mask_ratio=0.6)
    kept = torch.randn(B, keep_idx.shape[1], D, generator=gen(2), requires_grad=True)
    mask_token = torch.randn(D, generator=gen(3), requires_grad=True)
    full = scatter_tokens(kept, keep_idx, L, fill=mask_token)  # (B, L, D)
    assert full.shape == (B, L, D)
    assert torch.equal(gather_tokens(full, keep_idx), kept)
    assert torch.equal(full[mask], mask_token.expand(int(mask.sum()), D))
    full.sum().backward()
    assert torch.equal(mask_token.grad, torch.full((D,), float(mask.sum())))  # one use per hidden slot
    assert torch.equal(kept.grad, torch.ones_like(kept))

    ids = scatter_tokens(torch.tensor([[7, 8]]), torch.tensor([[3, 0]]), 5, fill=-1)  # (B, L) ids
    assert ids.tolist() == [[8, -1, -1, 7, -1]]


def test_restore_order_is_the_inverse_of_the_shuffle():
    B, L = 3, 12
    _, _, restore_idx = random_keep(B, L, gen(4), keep_ratio=0.25)
    x = torch.arange(B * L).view(B, L)
    shuffled = gather_tokens(x, restore_idx.argsort(dim=1))
    assert torch.equal(restore_order(shuffled, restore_idx), x)
    with pytest.raises(ValueError, match="concatenate the hidden-position fillers"):
        restore_order(shuffled[:, :3], restore_idx)


def test_mask_to_indices_and_masked_positions():
    _, mask, _ = random_keep(4, 20, gen(5), mask_ratio=0.7)
    idx = mask_to_indices(mask)
    assert idx.shape == (4, 14)
    for b in range(4):
        assert idx[b].tolist() == mask[b].nonzero().squeeze(1).tolist()  # ascending positions
    with pytest.raises(ValueError, match="different numbers of True"):
        mask_to_indices(torch.tensor([[True, False], [True, True]]))

    ragged = torch.tensor([[False, True, True], [True, False, False]])
    assert masked_positions(ragged).tolist() == [1, 2, 3]  # b * T + t


def test_select_masked_matches_boolean_indexing():
    B, T, D = 4, 32, 6
    ids = torch.randint(5, 50, (B, T), generator=gen(6))
    mask = bernoulli_token_mask(ids, 0.2, gen(7), [0, 1])
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    hidden = torch.randn(B, T, D, generator=gen(8))
    hidden_sel, labels_sel = select_masked(hidden, labels)
    assert hidden_sel.shape == (int(mask.sum()), D) and labels_sel.shape == (int(mask.sum()),)
    assert torch.equal(hidden_sel, hidden[mask])
    assert torch.equal(labels_sel, ids[mask])


def test_shape_errors():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match=r"idx must have shape \(B, T\)"):
        gather_tokens(x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be a long tensor"):
        gather_tokens(x, torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="idx has batch size 3 but x has 2"):
        gather_tokens(x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not broadcast"):
        scatter_tokens(x, torch.zeros(2, 5, dtype=torch.long), 8, fill=torch.zeros(4))
    with pytest.raises(ValueError, match="shorter than"):
        scatter_tokens(x, torch.zeros(2, 5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"hidden must have shape \(B, T, D\)"):
        select_masked(torch.randn(2, 4, 3), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="mask must have dtype torch.bool"):
        masked_positions(torch.zeros(2, 3, dtype=torch.long))
