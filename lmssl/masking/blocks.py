"""I-JEPA's masks: a few target blocks to predict and one context block to predict them from.

`jepa_masks` draws, per sample, `num_targets` target rectangles and one context rectangle
on the patch grid with `keep.sample_blocks_2d` (one block size per batch for the
targets and one for the context, as I-JEPA's collator does), removes the targets from
the context, and returns index tensors with the same number of patches in every row, so
that a batch stacks without padding:

- every target block has `h * w` patches (the shared size; blocks always fit the grid);
- the contexts are cut to the smallest context of the batch (I-JEPA truncates to the
  minimum too). I-JEPA keeps the first patches in raster order, which drops the bottom
  rows of the larger contexts; here the patches to keep are a uniform random subset of
  each context, so no part of the block is favoured.

Small grids make the blocks small (a 7 x 7 grid with I-JEPA's target scale (0.15, 0.2)
gives blocks of 6 to 12 patches), and four of them can cover most of the context block.
The sampler is robust to that: every block has at least one patch (height and width
are clamped to [1, grid]); a sample whose context keeps fewer than `min_context`
patches draws new block positions (same sizes), up to `tries` draws in all; a sample
with no good draw takes as its context the whole grid minus its targets (not limited to
the context block). If even that leaves fewer than
`min_context` patches, the geometry cannot work and a `ValueError` says so.

Everything runs on the CPU (in an objective's `prepare_batch`): the counts are Python
integers there, so the forward pass needs no host read to learn them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lmssl.masking._common import check_generator, uniform
from lmssl.masking.keep import blocks_to_mask, sample_blocks_2d


class JepaMasks(NamedTuple):
    """Index form of one batch's I-JEPA masks (positions are row-major patch indices)."""

    context_idx: torch.Tensor  # (B, Kc) long, ascending: the patches the context encoder sees
    target_idx: torch.Tensor  # (B, M, Kt) long, ascending per block: the patches of each target block
    target_blocks: torch.Tensor  # (B, M, 4) long: top, left, height, width of each target block
    context_block: torch.Tensor  # (B, 4) long: the context rectangle before the targets were removed (the
    # whole grid for a sample that fell back to it)


def jepa_masks(
    grid_h: int,
    grid_w: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    num_targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    context_aspect: tuple[float, float] = (1.0, 1.0),
    min_context: int = 1,
    tries: int = 20,
) -> JepaMasks:
    """Draw I-JEPA's target and context blocks for a batch (defaults: the paper's ranges).

    Args:
        grid_h, grid_w: the patch grid.
        batch_size: B.
        generator: the source of every draw (CPU).
        num_targets: M target blocks per sample (they may overlap each other).
        target_scale, target_aspect: area fraction and height/width ratio of the targets.
        context_scale, context_aspect: the same for the context block.
        min_context: fewest context patches a sample may keep (at least 1).
        tries: position draws per sample before the whole-grid fallback.

    Returns:
        :class:`JepaMasks`; `context_idx` and `target_idx` are disjoint in every sample.
    """
    check_generator(generator)
    if generator.device.type != "cpu":
        raise ValueError("jepa_masks draws on the CPU (in prepare_batch); give it a CPU torch.Generator")
    gh, gw, B, M = int(grid_h), int(grid_w), int(batch_size), int(num_targets)
    if B < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if M < 1:
        raise ValueError(f"num_targets must be >= 1, got {num_targets}")
    if int(min_context) < 1 or int(tries) < 1:
        raise ValueError(f"min_context and tries must be >= 1, got {min_context} and {tries}")
    N, T = gh * gw, int(tries)
    if N < 2:
        raise ValueError(f"a {gh} x {gw} patch grid is too small to hold both a context and a target")
    # the first try of every sample, with one block size for the batch (targets) and one (context)
    first_targets = sample_blocks_2d(gh, gw, B, generator, num_blocks=M, scale=target_scale,
                                     aspect_ratio=target_aspect, same_size=True)  # (B, M, 4)
    first_context = sample_blocks_2d(gh, gw, B, generator, num_blocks=1, scale=context_scale,
                                     aspect_ratio=context_aspect, same_size=True)[:, 0]  # (B, 4)
    h, w = (int(v) for v in first_targets[0, 0, 2:])
    ch, cw = (int(v) for v in first_context[0, 2:])

    def draw(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """New positions for ``rows`` samples, the sizes kept: a range of one value gives exactly that size."""
        t = sample_blocks_2d(gh, gw, rows, generator, num_blocks=M, scale=(h * w / N,) * 2, aspect_ratio=(h / w,) * 2)
        c = sample_blocks_2d(gh, gw, rows, generator, num_blocks=1, scale=(ch * cw / N,) * 2,
                             aspect_ratio=(ch / cw,) * 2)[:, 0]
        return t, c

    def region(targets: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks ``(R, M, 4)``, ``(R, 4)`` -> target indices ``(R, M, h * w)`` and context region ``(R, N)`` bool."""
        idx = block_indices(targets, h, w, gw)  # (R, M, h * w)
        covered = torch.zeros(len(idx), N, dtype=torch.bool).scatter_(1, idx.flatten(1), True)
        return idx, blocks_to_mask(context[:, None], gh, gw)[:, 0] & ~covered

    blocks, context_block = first_targets, first_context
    target_idx, context_mask = region(blocks, context_block)  # (B, M, h * w), (B, N)
    short = context_mask.sum(dim=1) < min_context  # (B,) samples that need another try
    for _ in range(T - 1):
        if not bool(short.any()):
            break
        rows = short.nonzero().squeeze(1)
        t, c = draw(len(rows))
        idx, mask = region(t, c)
        good = mask.sum(dim=1) >= min_context
        rows = rows[good]
        target_idx[rows], context_mask[rows], blocks[rows], context_block[rows] = idx[good], mask[good], t[good], c[good]
        short[rows] = False
    if bool(short.any()):  # no try left enough context: the whole grid minus the targets
        rows = short.nonzero().squeeze(1)
        context_mask[rows] = torch.ones(len(rows), N, dtype=torch.bool).scatter_(1, target_idx[rows].flatten(1), False)
        context_block[rows] = torch.tensor([0, 0, gh, gw])
    k = int(context_mask.sum(dim=1).min())
    if k < min_context:
        raise ValueError(f"{M} target blocks of {h} x {w} patches can cover the whole {gh} x {gw} grid, leaving "
                         f"{k} context patches (< min_context={min_context}); lower num_targets or target_scale, "
                         "or use smaller patches")
    # the context: a uniform random subset of k patches of each sample's context region, in ascending order
    noise = uniform((B, N), generator, None)  # (B, N)
    keep = torch.where(context_mask, noise, 2.0).argsort(dim=1)[:, :k]  # (B, k): context patches rank first
    return JepaMasks(keep.sort(dim=1).values, target_idx, blocks, context_block)


def block_indices(blocks: torch.Tensor, height: int, width: int, grid_w: int) -> torch.Tensor:
    """Row-major patch indices of blocks that all have the same size.

    Args:
        blocks: `(..., 4)` long top, left, height, width (the height and width equal to
            `height` and `width` in every block, as `sample_blocks_2d(..., same_size=True)`).

    Returns:
        `(..., height * width)` long, ascending within each block.
    """
    rows = blocks[..., 0, None, None] + torch.arange(height)[:, None]  # (..., height, 1)
    cols = blocks[..., 1, None, None] + torch.arange(width)[None, :]  # (..., 1, width)
    return (rows * grid_w + cols).flatten(-2)
