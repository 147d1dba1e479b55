"""The one masking core for every masked objective: index-based, model-agnostic, seeded.

Every random draw comes from an explicit `torch.Generator` argument; nothing here
touches torch's global RNG. Pieces:

- `tokens`: which token positions to hide — `bernoulli_token_mask` (BERT),
  `whole_word_mask`, `span_mask` (SpanBERT), and word-boundary helpers.
- `mlm`: `mlm_corrupt`, BERT's 80/10/10 corruption and the -100 labels.
- `keep`: which patches an encoder sees — `random_keep` (MAE) and 2-D block masks
  (BEiT / I-JEPA).
- `blocks`: `jepa_masks`, I-JEPA's target and context blocks as equal-length index rows.
- `gather`: gather / scatter / restore / select helpers shared by all objectives.

A BERT batch, for example::

    g = torch.Generator().manual_seed(0)
    mask = bernoulli_token_mask(input_ids, 0.15, g, tokenizer.all_special_ids, attention_mask)
    corrupted, labels = mlm_corrupt(input_ids, mask, g, mask_token_id=tokenizer.mask_token_id,
                                    vocab_size=len(tokenizer), special_ids=tokenizer.all_special_ids)
"""

from lmssl.masking.blocks import JepaMasks, jepa_masks
from lmssl.masking.gather import (
    gather_tokens,
    mask_to_indices,
    masked_positions,
    restore_order,
    scatter_tokens,
    select_masked,
)
from lmssl.masking.keep import block_mask_2d, blocks_to_mask, num_kept, random_keep, sample_blocks_2d
from lmssl.masking.mlm import IGNORE_INDEX, mlm_corrupt
from lmssl.masking.tokens import (
    bernoulli_token_mask,
    eligible_positions,
    expected_span_length,
    sample_span_lengths,
    span_mask,
    whole_word_mask,
    word_start_table,
    word_starts_from_tokens,
)

__all__ = [
    "IGNORE_INDEX",
    "JepaMasks",
    "bernoulli_token_mask",
    "block_mask_2d",
    "blocks_to_mask",
    "eligible_positions",
    "expected_span_length",
    "gather_tokens",
    "jepa_masks",
    "mask_to_indices",
    "masked_positions",
    "mlm_corrupt",
    "num_kept",
    "random_keep",
    "restore_order",
    "sample_blocks_2d",
    "sample_span_lengths",
    "scatter_tokens",
    "select_masked",
    "span_mask",
    "whole_word_mask",
    "word_start_table",
    "word_starts_from_tokens",
]
