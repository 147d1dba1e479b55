"""Evaluation: held-out loss, perplexity, bits-per-byte, k-NN accuracy of frozen features, and
collapse monitors of embeddings (normalised std, effective rank)."""

from lmssl.evaluate.collapse import collapse_metrics, collapse_warning, effective_rank, normalized_std
from lmssl.evaluate.knn import knn_accuracy, knn_predict
from lmssl.evaluate.lm import evaluate_objective, language_metrics

__all__ = ["collapse_metrics", "collapse_warning", "effective_rank", "evaluate_objective", "knn_accuracy",
           "knn_predict", "language_metrics", "normalized_std"]
