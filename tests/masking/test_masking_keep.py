"""random_keep (MAE) and 2-D block masks (BEiT / I-JEPA)."""

import pytest
import torch

from lmssl.masking import (
    block_mask_2d,
    blocks_to_mask,
    gather_tokens,
    num_kept,
    random_keep,
    restore_order,
    sample_blocks_2d,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- random_keep


@pytest.mark.parametrize(
    ("length", "mask_ratio", "kept"), [(196, 0.75, 49), (10, 0.5, 5), (12, 0.9, 1), (100, 0.71, 29)]
)
def test_kept_count_and_mask_sum_are_exact(length, mask_ratio, kept):
    assert num_kept(length, mask_ratio=mask_ratio) == kept
    keep_idx, mask, restore_idx = random_keep(6, length, gen(0), mask_ratio=mask_ratio)
    assert keep_idx.shape == (6, kept) and keep_idx.dtype == torch.long
    assert mask.shape == (6, length) and mask.dtype == torch.bool
    assert restore_idx.shape == (6, length) and restore_idx.dtype == torch.long
    assert torch.equal(mask.sum(dim=1), torch.full((6,), length - kept))
    for row_keep, row_mask in zip(keep_idx, mask):
        assert len(set(row_keep.tolist())) == kept  # unique per row
        assert not row_mask[row_keep].any()  # kept positions are exactly the unmasked ones


def test_num_kept_is_robust_to_float_error():
    assert 0.29 * 100 < 29 and 0.57 * 100 < 57  # plain int() would give 28 and 56
    assert num_kept(100, keep_ratio=0.29) == 29
    assert num_kept(100, keep_ratio=0.57) == 57
    assert num_kept(196, keep_ratio=0.25) == num_kept(196, mask_ratio=0.75) == 49


def test_restore_round_trips_exactly():
    B, L, D = 4, 196, 8
    x = torch.randn(B, L, D, generator=gen(1))
    keep_idx, mask, restore_idx = random_keep(B, L, gen(2), mask_ratio=0.75)
    shuffle = restore_idx.argsort(dim=1)  # kept first, then hidden
    assert torch.equal(shuffle[:, : keep_idx.shape[1]], keep_idx)
    assert torch.equal(restore_order(gather_tokens(x, shuffle), restore_idx), x)

    # MAE decoder input: kept tokens, then a filler for each hidden position, unshuffled.
    kept = gather_tokens(x, keep_idx)  # (B, K, D)
    filler = torch.zeros(B, L - keep_idx.shape[1], D)
    full = restore_order(torch.cat([kept, filler], dim=1), restore_idx)  # (B, L, D)
    assert torch.equal(full[~mask], x[~mask])
    assert bool((full[mask] == 0).all())


def test_keep_ratio_equals_one_minus_mask_ratio_and_determinism():
    a = random_keep(3, 50, gen(3), mask_ratio=0.6)
    b = random_keep(3, 50, gen(3), keep_ratio=0.4)
    c = random_keep(3, 50, gen(4), keep_ratio=0.4)
    for left, right in zip(a, b):
        assert torch.equal(left, right)
    assert not torch.equal(a[1], c[1])
    rows = a[1]
    assert not torch.equal(rows[0], rows[1])  # per-sample noise: rows differ
    assert random_keep(2, 8, gen(3), mask_ratio=0.5, device="cpu")[0].device.type == "cpu"


def test_every_position_is_kept_equally_often():
    keep_idx, _, _ = random_keep(20_000, 16, gen(5), mask_ratio=0.75)
    counts = torch.bincount(keep_idx.flatten(), minlength=16).double()  # 5000 expected, sd about 61
    assert ((counts / counts.mean()) - 1).abs().max() < 0.06


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio must be in the open interval"),
        ({"mask_ratio": 0.0}, "mask_ratio must be in the open interval"),
        ({"keep_ratio": 1.0}, "keep_ratio must be in the open interval"),
        ({}, "exactly one of mask_ratio or keep_ratio"),
        ({"mask_ratio": 0.5, "keep_ratio": 0.5}, "exactly one of mask_ratio or keep_ratio"),
        ({"mask_ratio": 0.9, "length": 5}, "keeps 0 positions"),
        ({"mask_ratio": 0.5, "length": 1}, "length must be >= 2"),
        ({"mask_ratio": 0.5, "batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_random_keep_errors(kwargs, message):
    args = {"batch_size": 2, "length": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        random_keep(args.pop("batch_size"), args.pop("length"), gen(0), **args)


# ---------------------------------------------------------------- block masks


def test_block_mask_shapes_and_union():
    blocks = sample_blocks_2d(14, 14, 8, gen(6), num_blocks=4)
    assert blocks.shape == (8, 4, 4) and blocks.dtype == torch.long
    per_block = blocks_to_mask(blocks, 14, 14)
    assert per_block.shape == (8, 4, 196)
    union = block_mask_2d(14, 14, 8, gen(6), num_blocks=4)
    assert union.shape == (8, 196) and union.dtype == torch.bool
    assert torch.equal(union, per_block.any(dim=1))


def test_blocks_are_contiguous_rectangles_inside_the_grid():
    H, W = 12, 20  # not square, so rows and columns are not confused
    masks = block_mask_2d(H, W, 300, gen(7), num_blocks=1, scale=(0.05, 0.3), aspect_ratio=(0.3, 3.0))
    for row in masks.view(300, H, W):
        r = row.any(dim=1).nonzero().squeeze(1)
        c = row.any(dim=0).nonzero().squeeze(1)
        assert len(r) and len(c)
        assert torch.equal(r, torch.arange(int(r[0]), int(r[-1]) + 1))  # contiguous rows
        assert torch.equal(c, torch.arange(int(c[0]), int(c[-1]) + 1))
        assert bool(row[int(r[0]) : int(r[-1]) + 1, int(c[0]) : int(c[-1]) + 1].all())  # filled box
        assert int(row.sum()) == len(r) * len(c)  # and nothing outside it


def test_block_sizes_follow_scale_and_aspect_ratio():
    H = W = 14
    scale, aspect = (0.15, 0.2), (0.75, 1.5)
    blocks = sample_blocks_2d(H, W, 2000, gen(8), num_blocks=1, scale=scale, aspect_ratio=aspect)
    top, left, height, width = blocks[:, 0].unbind(dim=-1)
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + height <= H).all() and (left + width <= W).all())
    fraction = (height * width).double() / (H * W)
    # rounding height and width to whole patches moves the area by up to about half a row + column
    slack = (height + width + 1).double() / 2 / (H * W)
    assert bool((fraction >= scale[0] - slack).all() and (fraction <= scale[1] + slack).all())
    assert abs(fraction.mean().item() - sum(scale) / 2) < 0.01
    ratio = height.double() / width.double()
    assert bool((ratio >= aspect[0] * 0.7).all() and (ratio <= aspect[1] / 0.7).all())
    assert ratio.min() < 1 < ratio.max()
    # positions vary over the grid
    assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 5


def test_block_mask_fraction_with_several_blocks_and_determinism():
    masks = block_mask_2d(14, 14, 500, gen(9), num_blocks=4, scale=(0.15, 0.2))
    fraction = masks.double().mean(dim=1)
    assert bool((fraction >= 0.1).all() and (fraction <= 4 * 0.2 + 0.1).all())
    assert 0.35 < fraction.mean().item() < 0.65  # overlap keeps the union below 4 * 0.175
    again = block_mask_2d(14, 14, 500, gen(9), num_blocks=4, scale=(0.15, 0.2))
    other = block_mask_2d(14, 14, 500, gen(10), num_blocks=4, scale=(0.15, 0.2))
    assert torch.equal(masks, again) and not torch.equal(masks, other)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": (0.3, 0.2)}, "scale must satisfy"),
        ({"scale": (0.0, 0.2)}, "scale must satisfy"),
        ({"scale": (0.5, 1.5)}, "scale must satisfy"),
        ({"aspect_ratio": (-1.0, 2.0)}, "aspect_ratio must satisfy"),
        ({"aspect_ratio": 2.0}, "aspect_ratio must be a pair"),
        ({"num_blocks": 0}, "num_blocks must be >= 1"),
        ({"grid_h": 0}, "grid_h and grid_w must be >= 1"),
    ],
)
def test_block_mask_errors(kwargs, message):
    args = {"grid_h": 14, "grid_w": 14, "batch_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        block_mask_2d(args.pop("grid_h"), args.pop("grid_w"), args.pop("batch_size"), gen(0), **args)
    with pytest.raises(ValueError, match=r"blocks must have shape \(B, N, 4\)"):
        blocks_to_mask(torch.zeros(2, 4, dtype=torch.long), 14, 14)
