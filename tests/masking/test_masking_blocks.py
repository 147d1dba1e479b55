"""I-JEPA's masks (jepa_masks) and the shared-size option of sample_blocks_2d."""

import pytest
import torch

from lmssl.masking import blocks_to_mask, jepa_masks, mask_to_indices, sample_blocks_2d
from lmssl.masking.blocks import block_indices


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_same_size_blocks_share_one_height_and_width_and_stay_inside():
    blocks = sample_blocks_2d(7, 9, 16, gen(0), num_blocks=4, same_size=True)  # (B, M, 4)
    top, left, h, w = blocks.unbind(-1)
    assert bool((h == h[0, 0]).all()) and bool((w == w[0, 0]).all())
    assert bool((top >= 0).all() & (top + h <= 7).all() & (left >= 0).all() & (left + w <= 9).all())
    assert len({(int(t), int(l)) for t, l in zip(top.flatten(), left.flatten())}) > 10  # positions still vary
    # the same draws as without the option: the first block of the first sample is identical
    assert torch.equal(sample_blocks_2d(7, 9, 16, gen(0), num_blocks=4)[0, 0], blocks[0, 0])


def test_block_indices_match_the_rasterised_blocks():
    blocks = sample_blocks_2d(6, 8, 5, gen(1), num_blocks=3, same_size=True)
    h, w = (int(v) for v in blocks[0, 0, 2:])
    expected = mask_to_indices(blocks_to_mask(blocks, 6, 8).reshape(15, 48)).view(5, 3, h * w)
    assert torch.equal(block_indices(blocks, h, w, 8), expected)


@pytest.mark.parametrize("grid", [7, 14])
def test_counts_ranges_disjointness_and_non_empty_context(grid):
    B, M, N = 64, 4, grid * grid
    masks = jepa_masks(grid, grid, B, gen(2), num_targets=M)
    ctx, tgt = masks.context_idx, masks.target_idx
    h, w = (int(v) for v in masks.target_blocks[0, 0, 2:])
    assert tgt.shape == (B, M, h * w) and ctx.dim() == 2 and ctx.shape[0] == B and ctx.shape[1] >= 1
    # target blocks: one size, area and aspect within I-JEPA's ranges up to the rounding of h and w
    assert bool((masks.target_blocks[..., 2] == h).all()) and bool((masks.target_blocks[..., 3] == w).all())
    assert (h - 0.5) * (w - 0.5) <= 0.2 * N and (h + 0.5) * (w + 0.5) >= 0.15 * N
    assert (h - 0.5) / (w + 0.5) <= 1.5 and (h + 0.5) / (w - 0.5) >= 0.75
    ch, cw = (int(v) for v in masks.context_block[0, 2:])
    assert ch == cw and (ch + 0.5) ** 2 >= 0.85 * N  # square, scale (0.85, 1.0)
    for b in range(B):
        c, t = set(ctx[b].tolist()), set(tgt[b].flatten().tolist())
        assert len(c) == ctx.shape[1] and not c & t  # unique, disjoint from every target
        top, left, hh, ww = masks.context_block[b].tolist()
        assert all(top <= i // grid < top + hh and left <= i % grid < left + ww for i in c)  # inside the context block
        for m in range(M):
            assert len(set(tgt[b, m].tolist())) == h * w
    assert torch.equal(ctx, ctx.sort(dim=1).values) and torch.equal(tgt, tgt.sort(dim=2).values)


def test_same_for_a_fixed_generator_and_different_for_another():
    a, b = jepa_masks(7, 7, 32, gen(5)), jepa_masks(7, 7, 32, gen(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = jepa_masks(7, 7, 32, gen(6))
    assert not torch.equal(a.target_idx, c.target_idx)


def test_the_context_is_the_smallest_of_the_batch_and_a_random_subset():
    masks = jepa_masks(7, 7, 128, gen(7))
    ctx = masks.context_idx
    # rebuild every sample's full context region: its block minus its targets
    region = blocks_to_mask(masks.context_block[:, None], 7, 7)[:, 0]
    region &= ~torch.zeros(128, 49, dtype=torch.bool).scatter_(1, masks.target_idx.flatten(1), True)
    assert int(region.sum(1).min()) == ctx.shape[1]  # truncated to the smallest context
    assert bool(region.gather(1, ctx).all())
    # the kept patches are not simply the first ones in raster order
    first = torch.stack([r.nonzero().squeeze(1)[:ctx.shape[1]] for r in region])
    assert not torch.equal(first, ctx)


def test_small_grids_and_large_targets_keep_a_context():
    for grid, scale in ((2, (0.2, 0.25)), (3, (0.15, 0.2)), (4, (0.3, 0.4))):
        masks = jepa_masks(grid, grid, 64, gen(grid), target_scale=scale)
        assert masks.context_idx.shape[1] >= 1 and masks.target_idx.shape[2] >= 1
        for b in range(64):
            assert not set(masks.context_idx[b].tolist()) & set(masks.target_idx[b].flatten().tolist())
    masks = jepa_masks(7, 7, 64, gen(0), min_context=20)  # more than the context block usually keeps
    assert masks.context_idx.shape[1] >= 20
    assert bool((masks.context_block == torch.tensor([0, 0, 7, 7])).all(dim=1).any())  # the whole-grid fallback


def test_impossible_geometry_is_one_clear_error():
    with pytest.raises(ValueError, match="cover the whole"):
        jepa_masks(2, 2, 4, gen(0), num_targets=2, target_scale=(1.0, 1.0), target_aspect=(1.0, 1.0))
    with pytest.raises(ValueError, match="num_targets"):
        jepa_masks(7, 7, 4, gen(0), num_targets=0)

