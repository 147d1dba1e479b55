"""Compare lmssl.masking with transformers' DataCollatorForLanguageModeling on real tokenizers.

Tokenizers are trained here with `tokenizers` on generated sentences (no network, no Hub)
and wrapped in `PreTrainedTokenizerFast`, the way a user's own tokenizer would be.
"""

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from lmssl.masking import (
    bernoulli_token_mask,
    eligible_positions,
    mlm_corrupt,
    whole_word_mask,
    word_start_table,
    word_starts_from_tokens,
)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BATCH, LENGTH = 240, 512


def made_up_words():
    """A fixed lexicon of ~600 made-up words of 1-4 syllables."""
    rng = random.Random(1234)
    syllables = ["ka", "lo", "mi", "ren", "tos", "vel", "du", "pra", "shi", "om", "ter", "an", "qu", "ix"]
    return sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(600)})


def generated_documents(n_docs, seed):
    """Documents over the fixed lexicon, with punctuation; lengths vary so some rows pad at 512."""
    rng = random.Random(seed)
    words = made_up_words()
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(30, 90)):
            sentence = " ".join(rng.choices(words, k=rng.randint(4, 14)))
            sentences.append(sentence.capitalize() + rng.choice([".", ".", "!", "?", ","]))
        docs.append(" ".join(sentences))
    return docs


def wrap(tokenizer):
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def word_level_tokenizer():
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        generated_documents(100, seed=0), trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=2)
    )
    return wrap(tokenizer)


@pytest.fixture(scope="module")
def byte_bpe_tokenizer():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(generated_documents(100, seed=1), trainer)
    return wrap(tokenizer)


def encode(tokenizer, seed):
    batch = tokenizer(
        generated_documents(BATCH, seed), truncation=True, max_length=LENGTH, padding="max_length", return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


def mlm_statistics(original, corrupted, labels, tokenizer):
    """Masked fraction of maskable tokens and the [MASK] / other-token / unchanged split."""
    chosen = labels != -100
    maskable = eligible_positions(original, tokenizer.all_special_ids)
    n = chosen.sum().item()
    mask_id = tokenizer.mask_token_id
    planted = corrupted[chosen & (corrupted != mask_id)]
    return {
        "fraction": n / maskable.sum().item(),
        "mask": (corrupted[chosen] == mask_id).sum().item() / n,
        "random": ((corrupted[chosen] != mask_id) & (corrupted[chosen] != original[chosen])).sum().item() / n,
        "unchanged": (corrupted[chosen] == original[chosen]).sum().item() / n,
        "special_planted": torch.isin(planted, torch.tensor(tokenizer.all_special_ids)).sum().item(),
        "rows_without_target": int((~chosen.any(dim=1) & maskable.any(dim=1)).sum()),
    }


def test_matches_data_collator_for_language_modeling(word_level_tokenizer):
    tokenizer = word_level_tokenizer
    input_ids, attention_mask = encode(tokenizer, seed=2)
    assert (attention_mask == 0).any() and eligible_positions(input_ids, tokenizer.all_special_ids).sum() > 100_000

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    reference = collator([{"input_ids": ids, "attention_mask": am} for ids, am in zip(input_ids, attention_mask)])
    hf = mlm_statistics(input_ids, reference["input_ids"], reference["labels"], tokenizer)

    g = torch.Generator().manual_seed(1)  # a different seed: compare statistics, not one shared draw
    mask = bernoulli_token_mask(input_ids, 0.15, g, tokenizer.all_special_ids, attention_mask)
    corrupted, labels = mlm_corrupt(
        input_ids,
        mask,
        g,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=tokenizer.all_special_ids,
    )
    ours = mlm_statistics(input_ids, corrupted, labels, tokenizer)
    maskable = eligible_positions(input_ids, tokenizer.all_special_ids).sum().item()
    print(f"\nvocab={len(tokenizer)} positions={input_ids.numel()} maskable={maskable}\n  hf:   {hf}\n  ours: {ours}")

    assert abs(ours["fraction"] - 0.15) < 0.005
    assert abs(hf["fraction"] - 0.15) < 0.005
    assert abs(ours["fraction"] - hf["fraction"]) < 0.005
    for key in ("mask", "random", "unchanged"):
        assert abs(ours[key] - hf[key]) < 0.012, (key, ours[key], hf[key])
    assert ours["special_planted"] == 0
    assert ours["rows_without_target"] == 0


def test_whole_word_mask_never_splits_tokenizer_words(byte_bpe_tokenizer):
    tokenizer = byte_bpe_tokenizer
    docs = generated_documents(40, seed=3)
    encoding = tokenizer(docs, truncation=True, max_length=256, padding="max_length", return_tensors="pt")
    input_ids, attention_mask = encoding["input_ids"], encoding["attention_mask"]

    table = word_start_table(tokenizer.convert_ids_to_tokens(range(len(tokenizer))), special_tokens=SPECIAL_TOKENS)
    assert 0 < table.sum() < len(tokenizer)  # a real mix of word starts and continuations
    word_starts = table[input_ids]  # (B, T), the fast path
    slow = word_starts_from_tokens(
        [tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist()], special_tokens=SPECIAL_TOKENS
    )
    # The table knows no positions: the slow path also marks position 0 and every token after a
    # special token, both of which whole_word_mask treats as word starts anyway.
    after_special = torch.zeros_like(slow)
    after_special[:, 1:] = torch.isin(input_ids[:, :-1], torch.tensor(tokenizer.all_special_ids))
    after_special[:, 0] = True
    assert torch.equal(slow & ~after_special, word_starts & ~after_special)
    assert bool((slow | ~word_starts).all())

    g = torch.Generator().manual_seed(0)
    mask = whole_word_mask(input_ids, word_starts, 0.15, g, tokenizer.all_special_ids, attention_mask)
    eligible = eligible_positions(input_ids, tokenizer.all_special_ids, attention_mask)
    assert abs(mask.sum().item() / eligible.sum().item() - 0.15) < 0.03
    multi_piece = 0
    for b in range(input_ids.shape[0]):
        pieces = {}
        for t, word in enumerate(encoding.word_ids(b)):
            if word is not None:
                pieces.setdefault(word, []).append(t)
        for positions in pieces.values():
            chosen = mask[b, positions]
            pieces_text = tokenizer.convert_ids_to_tokens(input_ids[b, positions])
            assert bool(chosen.all()) or not bool(chosen.any()), pieces_text
            multi_piece += len(positions) > 1 and bool(chosen.all())
    assert multi_piece > 50  # the check above saw many masked words made of several pieces
