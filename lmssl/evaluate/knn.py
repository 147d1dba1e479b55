"""Weighted k-nearest-neighbour classification of frozen features: the standard quick check
of a self-supervised representation, with nothing to train.

Each validation feature votes with its ``k`` most cosine-similar training features; a
neighbour at similarity ``s`` adds ``exp(s / temperature)`` to its class, and the class
with the largest total is the prediction (the weighted k-NN monitor of Wu et al. 2018,
used by DINO with ``k = 20`` and ``temperature = 0.07``). Unlike a linear probe it has no
optimiser, no seed and no hyper-parameter search, so it moves only when the features do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, block: int = 1024) -> torch.Tensor:
    """Predicted class of every query: ``train (N, D)``, ``train_labels (N,)`` ints,
    ``queries (M, D)`` -> ``(M,)``. Similarities are computed ``block`` queries at a time,
    so memory is ``block x N``. ``k`` is capped at ``N``."""
    if train.dim() != 2 or queries.dim() != 2 or train.shape[1] != queries.shape[1]:
        raise ValueError(f"knn_predict: train must be (N, D) and queries (M, D), got {tuple(train.shape)} and "
                         f"{tuple(queries.shape)}")
    if train_labels.shape != train.shape[:1]:
        raise ValueError(f"knn_predict: train_labels must be ({train.shape[0]},), got {tuple(train_labels.shape)}")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn_predict: k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, train.shape[0])
    classes = num_classes or int(train_labels.max()) + 1
    bank = F.normalize(train.float(), dim=1)  # (N, D)
    out = []
    for q in queries.float().split(block):
        sims, idx = (F.normalize(q, dim=1) @ bank.t()).topk(k, dim=1)  # (b, k)
        votes = torch.zeros(q.shape[0], classes, dtype=torch.float32, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sims / temperature).exp())  # (b, classes)
        out.append(votes.argmax(dim=1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Fraction of ``queries`` whose :func:`knn_predict` class equals ``labels`` (NaN for none)."""
    if not len(labels):
        return float("nan")
    classes = int(max(train_labels.max(), labels.max())) + 1
    pred = knn_predict(train, train_labels, queries, k, temperature, num_classes=classes)
    return float((pred == labels).float().mean())
