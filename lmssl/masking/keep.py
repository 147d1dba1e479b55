"""Which patches (or tokens) an encoder sees: MAE random keep and 2-D block masks.

`random_keep` is MAE's masking by sorting per-sample noise: it returns the kept
indices (the encoder runs on `gather_tokens(x, keep_idx)` only), a bool mask of the
hidden positions (the loss is averaged over them), and the restore indices that put
`cat(kept, hidden)` back in the original order (`gather.restore_order`).

`block_mask_2d` hides a few rectangles of a patch grid (BEiT / I-JEPA style);
`sample_blocks_2d` and `blocks_to_mask` expose the individual blocks for objectives
that predict each block separately.
"""

from __future__ import annotations

import math

import torch

from lmssl.masking._common import check_generator, check_open_unit, check_range, uniform


def num_kept(length: int, *, mask_ratio: float | None = None, keep_ratio: float | None = None) -> int:
    """Number of positions `random_keep` keeps: `floor(length * keep_ratio)`, in [1, length - 1].

    Give exactly one of `mask_ratio` or `keep_ratio` (= 1 - mask_ratio), each in (0, 1).
    """
    if (mask_ratio is None) == (keep_ratio is None):
        raise ValueError("give exactly one of mask_ratio or keep_ratio")
    if mask_ratio is not None:
        keep = 1.0 - check_open_unit("mask_ratio", mask_ratio)
    else:
        keep = check_open_unit("keep_ratio", keep_ratio)  # type: ignore[arg-type]
    length = int(length)
    if length < 2:
        raise ValueError(f"length must be >= 2 to both keep and hide something, got {length}")
    k = int(math.floor(length * keep + 1e-9))  # the epsilon absorbs float error, e.g. 0.29 * 100
    if not 1 <= k < length:
        ratio = f"mask_ratio={mask_ratio}" if mask_ratio is not None else f"keep_ratio={keep_ratio}"
        raise ValueError(
            f"{ratio} with length={length} keeps {k} positions; it must keep at least 1 and hide at least 1"
        )
    return k


def random_keep(
    batch_size: int,
    length: int,
    generator: torch.Generator,
    *,
    mask_ratio: float | None = None,
    keep_ratio: float | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample random masking: keep K = `num_kept(length, ...)` positions per row.

    Each row sorts its own uniform noise; the K positions with the smallest noise are
    kept (in that shuffled order, as in MAE), the rest are hidden.

    Args:
        batch_size: B.
        length: L, number of positions (patches or tokens) per row.
        generator: the source of every random draw.
        mask_ratio: fraction hidden, in (0, 1) (MAE: 0.75); or give `keep_ratio`.
        keep_ratio: fraction kept, in (0, 1).
        device: where the outputs live (draws happen on the generator's device).

    Returns:
        keep_idx: `(B, K)` long, positions kept, unique within each row.
        mask: `(B, L)` bool, True at hidden positions; exactly L - K per row.
        restore_idx: `(B, L)` long; for `y = cat([x_kept, x_hidden], dim=1)` in shuffled
            order, `gather_tokens(y, restore_idx)` is in the original order.
    """
    check_generator(generator)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k = num_kept(length, mask_ratio=mask_ratio, keep_ratio=keep_ratio)
    B, L = int(batch_size), int(length)
    noise = uniform((B, L), generator, device)  # (B, L)
    shuffle = noise.argsort(dim=1)  # (B, L) positions in the order: kept first, hidden after
    restore_idx = shuffle.argsort(dim=1)  # (B, L) inverse permutation
    keep_idx = shuffle[:, :k]  # (B, K)
    mask = torch.ones((B, L), dtype=torch.bool, device=noise.device).scatter_(1, keep_idx, False)
    return keep_idx, mask, restore_idx


def sample_blocks_2d(
    grid_h: int,
    grid_w: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    num_blocks: int = 4,
    scale: tuple[float, float] = (0.15, 0.2),
    aspect_ratio: tuple[float, float] = (0.75, 1.5),
    device: torch.device | str | None = None,
    same_size: bool = False,
) -> torch.Tensor:
    """Draw `num_blocks` rectangles per sample on a `grid_h x grid_w` patch grid.

    Each block independently gets an area of `U(scale) * grid_h * grid_w` patches and a
    height/width ratio drawn log-uniformly from `aspect_ratio`; height and width are
    rounded and clipped to the grid (so a block can come out slightly smaller or larger
    than its drawn area), and the top-left corner is uniform over the places it fits.
    Defaults are I-JEPA's target blocks.

    With `same_size`, every block of every sample takes the height and width drawn for
    the first block of the first sample (I-JEPA's collator draws one block size per
    batch), so all blocks cover the same number of patches; positions stay per block.
    The draws are the same either way (only which of them is used changes).

    Returns:
        `(B, num_blocks, 4)` long: top, left, height, width of each block.
    """
    check_generator(generator)
    grid_h, grid_w, batch_size, num_blocks = int(grid_h), int(grid_w), int(batch_size), int(num_blocks)
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid_h and grid_w must be >= 1, got {grid_h} x {grid_w}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    s_lo, s_hi = check_range("scale", scale, low=0.0, high=1.0)
    a_lo, a_hi = check_range("aspect_ratio", aspect_ratio, low=0.0, high=None)

    u = uniform((batch_size, num_blocks, 4), generator, device).double()  # (B, N, 4)
    size_u = u[:1, :1, :2].expand(batch_size, num_blocks, 2) if same_size else u[..., :2]  # (B, N, 2)
    area = (s_lo + (s_hi - s_lo) * size_u[..., 0]) * (grid_h * grid_w)  # (B, N) patches
    log_ar = math.log(a_lo) + (math.log(a_hi) - math.log(a_lo)) * size_u[..., 1]
    ratio = torch.exp(log_ar)  # height / width
    height = torch.round(torch.sqrt(area * ratio)).clamp(1, grid_h).long()  # (B, N)
    width = torch.round(torch.sqrt(area / ratio)).clamp(1, grid_w).long()  # (B, N)
    top = torch.floor(u[..., 2] * (grid_h - height + 1)).long()  # uniform in [0, grid_h - height]
    left = torch.floor(u[..., 3] * (grid_w - width + 1)).long()
    return torch.stack([top, left, height, width], dim=-1)


def blocks_to_mask(blocks: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Rasterise rectangles onto the patch grid, one mask per block.

    Args:
        blocks: `(B, N, 4)` long top, left, height, width (from `sample_blocks_2d`).

    Returns:
        `(B, N, grid_h * grid_w)` bool, row-major (patch index = row * grid_w + col).
    """
    if blocks.dim() != 3 or blocks.shape[-1] != 4:
        raise ValueError(f"blocks must have shape (B, N, 4) = top, left, height, width; got {tuple(blocks.shape)}")
    top, left, height, width = blocks.unbind(dim=-1)  # each (B, N)
    rows = torch.arange(grid_h, device=blocks.device)  # (H,)
    cols = torch.arange(grid_w, device=blocks.device)  # (W,)
    in_rows = (rows >= top[..., None]) & (rows < (top + height)[..., None])  # (B, N, H)
    in_cols = (cols >= left[..., None]) & (cols < (left + width)[..., None])  # (B, N, W)
    inside = in_rows[..., :, None] & in_cols[..., None, :]  # (B, N, H, W)
    return inside.flatten(start_dim=2)


def block_mask_2d(
    grid_h: int,
    grid_w: int,
    batch_size: int,
    generator: torch.Generator,
    *,
    num_blocks: int = 4,
    scale: tuple[float, float] = (0.15, 0.2),
    aspect_ratio: tuple[float, float] = (0.75, 1.5),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Hide the union of `num_blocks` random rectangles per sample (see `sample_blocks_2d`).

    Blocks may overlap, so the hidden fraction is at most `num_blocks * scale[1]`
    (about, after rounding) and varies per sample.

    Returns:
        `(B, grid_h * grid_w)` bool, True at hidden patches, row-major.
    """
    blocks = sample_blocks_2d(
        grid_h,
        grid_w,
        batch_size,
        generator,
        num_blocks=num_blocks,
        scale=scale,
        aspect_ratio=aspect_ratio,
        device=device,
    )
    return blocks_to_mask(blocks, grid_h, grid_w).any(dim=1)
