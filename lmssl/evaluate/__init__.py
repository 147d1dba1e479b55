"""Evaluation: held-out loss, perplexity, bits-per-byte, and objective metrics."""

from lmssl.evaluate.lm import evaluate_objective, language_metrics

__all__ = ["evaluate_objective", "language_metrics"]
