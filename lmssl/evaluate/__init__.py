"""Evaluation: held-out loss, perplexity, bits-per-byte, and k-NN accuracy of frozen features."""

from lmssl.evaluate.knn import knn_accuracy, knn_predict
from lmssl.evaluate.lm import evaluate_objective, language_metrics

__all__ = ["evaluate_objective", "knn_accuracy", "knn_predict", "language_metrics"]
