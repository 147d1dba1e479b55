"""Global sample positions -> example ids, the one visiting order every position-keyed source uses.

Position ``g`` of a source of ``n`` examples is example ``order(g // n)[g % n]``, where
``order(epoch)`` is a permutation seeded by ``(seed, epoch)``; without shuffling it is example
``g % n``. Any process, DataLoader worker or resumed run that asks for position ``g`` gets the
same example, so batches depend on positions only, never on who reads them."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PositionKeyed", "epoch_order"]


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """Visiting order of epoch ``epoch``: a permutation of ``n`` seeded by ``(seed, epoch)``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class PositionKeyed:
    """Mixin for map-style sources keyed by global position: set ``n``, ``seed`` and ``shuffle``
    and define ``batch(positions)``; ``ids(positions)`` maps positions to example ids, and
    ``__getitems__`` (a DataLoader's batched fetch) / ``__getitem__`` call ``batch``."""

    n: int
    seed: int
    shuffle: bool
    _order_epoch: int = -1
    _order: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order, self._order_epoch = epoch_order(self.seed, epoch, self.n), epoch
        return self._order

    def ids(self, positions: list[int]) -> list[int]:
        if not self.shuffle:
            return [g % self.n for g in positions]
        return [int(self.order(g // self.n)[g % self.n]) for g in positions]

    def batch(self, positions: list[int]) -> Any:
        raise NotImplementedError

    def __getitems__(self, positions: list[int]) -> Any:
        return self.batch(positions)

    def __getitem__(self, position: int) -> Any:
        return self.batch([position])
