"""Index helpers shared by every masked objective: gather, scatter, restore, select.

All of them work on a sequence axis at dim 1 and any trailing feature dims, so the
same call moves token ids `(B, L)`, embeddings `(B, L, D)` or pixel targets
`(B, L, P, C)`.
"""

from __future__ import annotations

import torch

from lmssl.masking._common import check_2d


def _check_index(name: str, idx: torch.Tensor, x: torch.Tensor) -> None:
    check_2d(name, idx)
    if idx.dtype != torch.long:
        raise ValueError(f"{name} must be a long tensor, got {idx.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, L, ...), got {tuple(x.shape)}")
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"{name} has batch size {idx.shape[0]} but x has {x.shape[0]}")


def _expand_index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`(B, K)` -> `(B, K, *like.shape[2:])` view, for gather/scatter along dim 1."""
    view = idx.reshape(*idx.shape, *([1] * (like.dim() - 2)))
    return view.expand(*idx.shape, *like.shape[2:])


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick positions `idx` from each row of `x`.

    Args:
        x: `(B, L)` or `(B, L, ...)`.
        idx: `(B, K)` long positions in [0, L).

    Returns:
        `(B, K)` or `(B, K, ...)`: `out[b, k] = x[b, idx[b, k]]`.
    """
    _check_index("idx", idx, x)
    return torch.gather(x, 1, _expand_index(idx.to(x.device), x))


def scatter_tokens(
    x_kept: torch.Tensor, idx: torch.Tensor, length: int, fill: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Place `x_kept` back at positions `idx` of a length-`length` sequence; the rest is `fill`.

    Differentiable in both `x_kept` and `fill` (e.g. a learned mask-token embedding).

    Args:
        x_kept: `(B, K)` or `(B, K, ...)`.
        idx: `(B, K)` long positions in [0, length), unique within each row.
        length: L.
        fill: a scalar, or a tensor broadcastable to `x_kept.shape[2:]` (e.g. `(D,)`).

    Returns:
        `(B, L)` or `(B, L, ...)` with `out[b, idx[b, k]] = x_kept[b, k]`.
    """
    _check_index("idx", idx, x_kept)
    if idx.shape[1] != x_kept.shape[1]:
        raise ValueError(f"idx has {idx.shape[1]} positions per row but x_kept has {x_kept.shape[1]}")
    if int(length) < idx.shape[1]:
        raise ValueError(f"length={length} is shorter than the {idx.shape[1]} positions to place")
    B = x_kept.shape[0]
    shape = (B, int(length), *x_kept.shape[2:])
    fill = torch.as_tensor(fill, dtype=x_kept.dtype, device=x_kept.device)
    try:
        base = fill.expand(shape).clone()  # clone of an expand keeps the gradient path to `fill`
    except RuntimeError:
        raise ValueError(f"fill of shape {tuple(fill.shape)} does not broadcast to {shape}") from None
    return base.scatter(1, _expand_index(idx.to(x_kept.device), x_kept), x_kept)


def restore_order(x_shuffled: torch.Tensor, restore_idx: torch.Tensor) -> torch.Tensor:
    """Undo `random_keep`'s shuffle (MAE decoder input: kept tokens then mask tokens).

    Args:
        x_shuffled: `(B, L, ...)`, the kept tokens followed by fillers for the hidden ones.
        restore_idx: `(B, L)` from `random_keep`.

    Returns:
        `(B, L, ...)` in the original position order.
    """
    if x_shuffled.dim() >= 2 and restore_idx.dim() == 2 and x_shuffled.shape[1] != restore_idx.shape[1]:
        raise ValueError(
            f"x_shuffled has {x_shuffled.shape[1]} positions but restore_idx has {restore_idx.shape[1]}; "
            "concatenate the hidden-position fillers to the kept tokens first"
        )
    return gather_tokens(x_shuffled, restore_idx)


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """Positions of True per row, for masks with the same count in every row.

    Args:
        mask: `(B, T)` bool with the same number K of True in each row.

    Returns:
        `(B, K)` long, ascending within each row.
    """
    check_2d("mask", mask, dtype=torch.bool)
    counts = mask.sum(dim=1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError(
            f"mask rows have different numbers of True ({int(counts.min())}..{int(counts.max())}); "
            "use masked_positions for ragged masks"
        )
    k = int(counts[0]) if counts.numel() else 0
    # A stable sort puts the True positions first, in ascending order.
    order = (~mask).to(torch.uint8).argsort(dim=1, stable=True)  # (B, T)
    return order[:, :k]


def masked_positions(mask: torch.Tensor) -> torch.Tensor:
    """Flat indices into `B * T` of the True positions, row-major.

    Args:
        mask: `(B, T)` bool.

    Returns:
        `(N,)` long with N = mask.sum(); index `b * T + t` for each True at (b, t).
        (Synchronises with the device, as any ragged selection must.)
    """
    check_2d("mask", mask, dtype=torch.bool)
    return mask.reshape(-1).nonzero().squeeze(1)


def select_masked(
    hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only the positions with a label, so a head computes logits there only.

    Args:
        hidden: `(B, T, D)` hidden states.
        labels: `(B, T)` long, `ignore_index` where there is nothing to predict.
        index: `(N,)` long, ``masked_positions(labels != ignore_index)`` when the caller
            has it already (computed on the host while the batch was made, it spares the
            device a synchronisation); computed here otherwise.

    Returns:
        hidden_sel: `(N, D)`, the rows of `hidden` at labelled positions (row-major).
        labels_sel: `(N,)` the matching labels; N = (labels != ignore_index).sum().
    """
    check_2d("labels", labels)
    if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
        raise ValueError(
            f"hidden must have shape (B, T, D) matching labels (B, T) = {tuple(labels.shape)}, "
            f"got {tuple(hidden.shape)}"
        )
    flat = (masked_positions(labels != ignore_index) if index is None else index).to(hidden.device)  # (N,)
    hidden_sel = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat)  # (N, D)
    labels_sel = labels.reshape(-1).index_select(0, flat.to(labels.device))  # (N,)
    return hidden_sel, labels_sel
