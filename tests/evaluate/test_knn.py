"""Weighted k-NN on frozen features, against a per-query loop that spells out the rule."""

from __future__ import annotations

import math

import pytest
import torch

from lmssl.evaluate.knn import knn_accuracy, knn_predict


def _by_hand(train, train_labels, query, k, temperature, classes):
    sims = [float(torch.dot(query, t) / (query.norm() * t.norm())) for t in train]
    order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
    votes = [0.0] * classes
    for i in order:
        votes[int(train_labels[i])] += math.exp(sims[i] / temperature)
    return max(range(classes), key=lambda c: votes[c])


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.5), (100, 1.0)])
def test_knn_matches_the_rule_query_by_query(k, temperature):
    g = torch.Generator().manual_seed(k)
    train, labels = torch.randn(60, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (60,), generator=g)
    queries = torch.randn(25, 8, generator=g, dtype=torch.float64)
    ours = knn_predict(train, labels, queries, k=k, temperature=temperature, num_classes=4, block=7)
    expected = [_by_hand(train, labels, q, min(k, 60), temperature, 4) for q in queries]
    assert ours.tolist() == expected


def test_knn_separates_clusters_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(30)
    feats = centres[labels] + 0.3 * torch.randn(90, 16, generator=g)
    assert knn_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2]) == 1.0
    shuffled = labels[torch.randperm(90, generator=g)]  # labels unrelated to the features: near chance
    assert knn_accuracy(feats[::2], shuffled[::2], feats[1::2], shuffled[1::2]) < 0.6
    assert math.isnan(knn_accuracy(feats, labels, feats[:0], labels[:0]))  # nothing to score
    with pytest.raises(ValueError, match="queries"):
        knn_predict(feats, labels, feats[:, :3])
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(feats, labels[:-1], feats)
