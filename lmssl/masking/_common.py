"""Private helpers shared by the masking modules: argument checks and seeded draws.

Every random number in `lmssl.masking` is drawn here, from an explicit
`torch.Generator`, on the generator's own device, and then moved to the device of
the data. So a CPU generator can drive masks for CUDA tensors, and the same seed
gives the same mask on every device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Shape = tuple[int, ...]


def check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator, got {type(generator).__name__}; "
            "create one with torch.Generator().manual_seed(seed)"
        )
    return generator


def check_open_unit(name: str, value: float) -> float:
    """`value` must lie strictly between 0 and 1."""
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in the open interval (0, 1), got {value}")
    return value


def check_closed_unit(name: str, value: float) -> float:
    """`value` must lie in [0, 1]."""
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_2d(name: str, tensor: object, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` must be a (B, T) tensor (and of `dtype`, when given)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, T), got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(tensor.shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
    return tensor


def check_same_shape(name: str, tensor: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(like.shape):
        raise ValueError(
            f"{name} has shape {tuple(tensor.shape)} but {like_name} has shape {tuple(like.shape)}; "
            "they must match"
        )


def check_range(name: str, bounds: tuple[float, float], *, low: float, high: float | None) -> tuple[float, float]:
    """`bounds` must be an ordered pair (lo, hi) with low < lo <= hi (<= high when given)."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {bounds!r}") from None
    if not (low < lo <= hi) or (high is not None and hi > high):
        upper = "" if high is None else f" <= {high}"
        raise ValueError(f"{name} must satisfy {low} < lo <= hi{upper}, got {(lo, hi)}")
    return lo, hi


def ids_tensor(ids: Iterable[int] | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """A 1-D long tensor of token ids (possibly empty) on `device`."""
    if ids is None:
        return torch.empty(0, dtype=torch.long, device=device)
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).to(device=device, dtype=torch.long)
    return torch.tensor([int(i) for i in ids], dtype=torch.long, device=device)


def uniform(shape: Shape, generator: torch.Generator, device: torch.device | str | None) -> torch.Tensor:
    """U[0, 1) float32 noise of `shape`, drawn on the generator's device, returned on `device`."""
    noise = torch.rand(shape, generator=generator, device=generator.device)
    return noise if device is None else noise.to(device)


def randint(high: int, shape: Shape, generator: torch.Generator, device: torch.device | str | None) -> torch.Tensor:
    """Uniform integers in [0, high) of `shape` (long), drawn on the generator's device."""
    out = torch.randint(high, shape, generator=generator, device=generator.device)
    return out if device is None else out.to(device)
