"""lmssl: self-supervised pretraining on one transformer core (GPT, BERT, CPC), exported to transformers."""

__version__ = "0.1.0"
