"""Train, measure and load tokenizers.

Three models, all saved as a ``transformers`` fast-tokenizer folder that
``AutoTokenizer.from_pretrained(folder)`` reloads with the same ids:

- ``bpe``: byte-level BPE (GPT-2 style) trained with ``tokenizers``. All 256 bytes are
  in the base alphabet, so no text is ever unknown and decoding is lossless.
- ``unigram``: a SentencePiece unigram model (identity normalisation, byte fallback)
  trained with ``sentencepiece`` and rebuilt as a ``tokenizers`` Unigram model with a
  Metaspace (``▁``) pre-tokenizer. Round trips are exact, except that whitespace at the
  very start of a text is dropped, as SentencePiece itself does.
- ``wordpiece``: cased BERT-style WordPiece trained with ``tokenizers``. It splits off
  punctuation, so decoding rejoins words with single spaces (``Shinar ; and``).

Every model gets the same special tokens at ids 0..5 (:data:`SPECIAL_TOKENS`) and no
post-processor: lmssl packs documents itself with ``<|endoftext|>`` between them.

Training streams its input: files are read line by line through generators and
handed to the trainers in batches, so memory depends on the vocabulary, not the corpus
size (SentencePiece keeps a sample of at most :data:`SPM_SAMPLE_SENTENCES` lines).

A run's tokenizer (:func:`resolve_tokenizer`): ``data.tokenizer`` names one, or is
``auto``: a ``data.tokenizer_model`` tokenizer of ``data.tokenizer_vocab_size`` entries is
trained on the run's own training documents (streamed, at most :data:`AUTO_MAX_DOCUMENTS`)
before pretraining, kept in ``RUN_DIR/tokenizer/``, reused on resume and shipped by
``lmssl export``. A run that keeps the default tokenizer on other data has its bytes per
token measured there against the bundled corpus, and is told in one line when the figure is
below :data:`FIT_WARNING_RATIO` of the bundled one.

Command line (registered by :mod:`lmssl.cli` as ``lmssl tokenizer``)::

    lmssl tokenizer train --files lmssl/data/corpus/kjv_train.txt --vocab-size 8192 --model bpe --out tokenizer
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib.resources
import io
import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from lmssl.data.files import builder_for, resolve_files
from lmssl.errors import UserError

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

MODELS = ("bpe", "unigram", "wordpiece")

# Special tokens, in id order 0..5. Their roles: <|endoftext|> is both eos and bos.
SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<unk>", "<mask>", "<cls>", "<sep>")
SPECIAL_TOKEN_ROLES = ("eos_token", "pad_token", "unk_token", "mask_token", "cls_token", "sep_token")

# Smallest vocabulary each model can be trained to: byte-level models need the 256
# bytes plus the special tokens plus some room for merges/pieces.
MIN_VOCAB_SIZE = {"bpe": 300, "unigram": 300, "wordpiece": 100}

BATCH_LINES = 1000  # lines per batch handed to the `tokenizers` trainers
SPM_MAX_SENTENCE_BYTES = 16384  # longer lines are cut at spaces before SentencePiece sees them
SPM_SAMPLE_SENTENCES = 1_000_000  # SentencePiece keeps a random sample of at most this many lines
RETRAIN_DEFAULT = (  # the command that made the shipped tokenizer/ folder
    "lmssl tokenizer train --files lmssl/data/corpus/kjv_train.txt --vocab-size 8192 --model bpe --out tokenizer"
)


# ----------------------------------------------------------------------------------
# Input: files, folders and globs, streamed line by line


def _open_text(path: Path) -> TextIO:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _iter_file(path: Path, text_column: str) -> Iterator[str]:
    """Yield the non-blank documents of one file, one line at a time (csv and parquet
    stream through ``datasets``)."""
    if builder_for(path) in ("csv", "parquet"):
        yield from _iter_table(path, text_column)
        return
    is_json = path.name.removesuffix(".gz").endswith((".jsonl", ".json"))
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if not is_json:
                yield line.rstrip("\r\n")
                continue
            if line_no == 1 and line.lstrip().startswith("["):
                example = "{" + json.dumps(text_column) + ": ...}"
                raise UserError(f"{path} is a JSON array; save it as JSON Lines (one {example} object per line)")
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {line_no} is not valid JSON ({e.msg}); expected JSON Lines") from None
            if not isinstance(record, dict) or text_column not in record:
                raise UserError(
                    f"{path} line {line_no} has no {text_column!r} field; "
                    "pass --text-column with the field that holds the text"
                )
            text = record[text_column]
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path} line {line_no}: field {text_column!r} is {type(text).__name__}, not text")
            if text.strip():
                yield text


def _iter_table(path: Path, text_column: str) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(builder_for(path), data_files=[str(path)], split="train", streaming=True)
    for row in ds:
        if text_column not in row:
            raise UserError(f"{path} has no {text_column!r} column (it has {sorted(row)}); pass --text-column")
        if isinstance(row[text_column], str) and row[text_column].strip():
            yield row[text_column]


def iter_texts(
    files: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    text_column: str = "text",
    max_lines: int | None = None,
) -> Iterator[str]:
    """Stream the documents (non-blank lines, or the ``text_column`` of JSON Lines) of
    ``files`` in order, at most ``max_lines`` of them. Nothing is read ahead."""
    paths = [Path(f) for f in resolve_files(files)]
    texts = itertools.chain.from_iterable(_iter_file(p, text_column) for p in paths)
    if max_lines is not None:
        texts = itertools.islice(texts, max_lines)
    return texts


def _non_empty(texts: Iterator[str], where: str) -> Iterator[str]:
    """Return ``texts`` unchanged, but raise UserError now if it yields nothing."""
    first = next(texts, None)
    if first is None:
        raise UserError(f"no text found in {where}; the files hold only blank lines")
    return itertools.chain([first], texts)


def _batches(texts: Iterable[str], size: int = BATCH_LINES) -> Iterator[list[str]]:
    it = iter(texts)
    while batch := list(itertools.islice(it, size)):
        yield batch


# ----------------------------------------------------------------------------------
# Training


def train_tokenizer(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int,
    model: str = "bpe",
    out_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    max_lines: int | None = None,
    text_column: str = "text",
    pad_to_multiple_of: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a ``model`` tokenizer ("bpe", "unigram" or "wordpiece") with ``vocab_size``
    entries (special tokens included) on ``files`` and save it into ``out_dir``.

    files: files, folders or globs; .txt is one document per line, .jsonl/.json holds
        one JSON object per line with the text under ``text_column`` (.gz also works).
    min_frequency: pairs/words seen fewer times are not merged (bpe, wordpiece).
    special_tokens: six tokens, given ids 0..5, in the roles eos (also bos), pad, unk,
        mask, cls, sep.
    max_lines: read at most this many documents.
    pad_to_multiple_of: round ``vocab_size`` up to a multiple of this (off by default;
        lmssl models pad their embedding table separately).

    Returns the tokenizer; when ``out_dir`` is None nothing is written. The folder is
    written only after training succeeded.
    """
    if model not in MODELS:
        raise UserError(f"unknown tokenizer model {model!r}; choose one of {', '.join(MODELS)}")
    if pad_to_multiple_of is not None:
        if pad_to_multiple_of < 1:
            raise UserError(f"pad_to_multiple_of must be a positive integer, got {pad_to_multiple_of}")
        vocab_size = math.ceil(vocab_size / pad_to_multiple_of) * pad_to_multiple_of
    if vocab_size < MIN_VOCAB_SIZE[model]:
        raise UserError(
            f"vocab size {vocab_size} is too small for {model}; use at least {MIN_VOCAB_SIZE[model]}"
            + (" (256 byte tokens + special tokens + merges)" if model != "wordpiece" else "")
        )
    if len(special_tokens) != len(SPECIAL_TOKEN_ROLES) or len(set(special_tokens)) != len(special_tokens):
        raise UserError(
            f"special_tokens must be {len(SPECIAL_TOKEN_ROLES)} distinct tokens, for the roles {SPECIAL_TOKEN_ROLES}"
        )
    if max_lines is not None and max_lines < 1:
        raise UserError(f"max_lines must be at least 1, got {max_lines}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"{out_dir} is a file; --out must be a folder (it is created if missing)")

    paths = [Path(f) for f in resolve_files(files)]
    texts = _non_empty(iter_texts(paths, text_column=text_column, max_lines=max_lines), ", ".join(map(str, paths)))
    return train_from_texts(texts, vocab_size, model, out_dir, min_frequency=min_frequency,
                            special_tokens=special_tokens)


def train_from_texts(
    texts: Iterator[str],
    vocab_size: int,
    model: str = "bpe",
    out_dir: str | os.PathLike | None = None,
    *,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
) -> PreTrainedTokenizerFast:
    """:func:`train_tokenizer` on a stream of documents (consumed once, in batches) instead of files."""
    special_tokens = list(special_tokens)
    if model == "unigram":
        backend = _train_unigram(texts, vocab_size, special_tokens)
    else:
        backend = _train_with_tokenizers(texts, vocab_size, model, min_frequency, special_tokens)

    tok = _wrap(backend, special_tokens)
    if out_dir is not None:
        _save(tok, Path(out_dir))
    return tok


def _save(tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(os.fspath(out_dir))
    # transformers 5 records its class as "TokenizersBackend", a name that transformers
    # 4.x cannot load; "PreTrainedTokenizerFast" loads the same tokenizer.json in both.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _train_with_tokenizers(
    texts: Iterator[str], vocab_size: int, model: str, min_frequency: int, special_tokens: list[str]
) -> Tokenizer:
    """Byte-level BPE or cased BERT-style WordPiece, trained by `tokenizers` from batches of lines."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    unk = special_tokens[SPECIAL_TOKEN_ROLES.index("unk_token")]
    if model == "bpe":
        tok = Tokenizer(models.BPE())  # no unk token: every byte is in the alphabet
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        tok = Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix="##"))
        tok.normalizer = normalizers.BertNormalizer(  # cased: no lowercasing, accents kept
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace + punctuation
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            continuing_subword_prefix="##",
            show_progress=False,
        )
    tok.train_from_iterator(_batches(texts), trainer=trainer)
    return tok


def _spm_sentences(texts: Iterable[str], limit: int = SPM_MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Cut documents longer than ``limit`` UTF-8 bytes at spaces (unigram pieces never
    span a space), so SentencePiece skips none of them."""
    for text in texts:
        if len(text.encode("utf-8")) <= limit:
            yield text
            continue
        chunk: list[str] = []
        size = 0
        for word in text.split(" "):
            while len(word.encode("utf-8")) > limit:  # a run with no spaces (e.g. CJK): cut by characters
                head, word = word[: limit // 4], word[limit // 4 :]  # <= 4 bytes per character
                if chunk:
                    yield " ".join(chunk)
                    chunk, size = [], 0
                yield head
            n = len(word.encode("utf-8")) + 1
            if chunk and size + n > limit:
                yield " ".join(chunk)
                chunk, size = [], 0
            chunk.append(word)
            size += n
        if chunk and any(chunk):
            yield " ".join(chunk)


def _train_unigram(texts: Iterator[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A SentencePiece unigram model trained on the stream, as a `tokenizers` Tokenizer."""
    return _unigram_from_sentencepiece(_train_sentencepiece(texts, vocab_size, special_tokens), special_tokens)


def _train_sentencepiece(texts: Iterator[str], vocab_size: int, special_tokens: list[str]) -> bytes:
    """Train a SentencePiece unigram model with the special tokens at ids 0..5; returns
    the serialized model."""
    import sentencepiece as spm

    eos, pad, unk, *control = special_tokens
    model_proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_spm_sentences(texts),
            model_writer=model_proto,
            model_type="unigram",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # a small corpus may give fewer pieces, as BPE does
            byte_fallback=True,  # unseen characters become <0xNN> byte pieces, never <unk>
            normalization_rule_name="identity",  # keep text as is: exact round trips
            remove_extra_whitespaces=False,
            eos_id=0, eos_piece=eos,
            pad_id=1, pad_piece=pad,
            unk_id=2, unk_piece=unk,
            bos_id=-1,  # bos is the eos token, as in GPT-2
            control_symbols=control,  # ids 3, 4, 5
            max_sentence_length=SPM_MAX_SENTENCE_BYTES,
            input_sentence_size=SPM_SAMPLE_SENTENCES,
            shuffle_input_sentence=True,
            num_threads=max(1, min(os.cpu_count() or 1, 16)),
            minloglevel=2,  # errors only
        )
    except RuntimeError as e:
        message = " ".join(str(e).split())
        raise UserError(f"sentencepiece could not train a {vocab_size}-piece unigram model: {message}") from None
    return model_proto.getvalue()


def _unigram_from_sentencepiece(model_proto: bytes, special_tokens: list[str]) -> Tokenizer:
    """Rebuild a SentencePiece unigram model as a `tokenizers` Unigram model with the
    same pieces, scores and ids, a Metaspace pre-tokenizer and byte fallback."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    got = [sp.id_to_piece(i) for i in range(len(special_tokens))]
    if got != special_tokens:  # guards the id layout requested in _train_sentencepiece
        raise RuntimeError(f"sentencepiece put the special tokens at unexpected ids: {got}")
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]

    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True))
    # "▁" marks a word start, as in SentencePiece; prepended to the first word only.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)]
    )
    return tok


def _wrap(backend: Tokenizer, special_tokens: list[str]) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    roles = dict(zip(SPECIAL_TOKEN_ROLES, special_tokens))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=roles["eos_token"], **roles)


# ----------------------------------------------------------------------------------
# Measuring


def tokenizer_stats(
    tok: PreTrainedTokenizerBase,
    files_or_texts: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    max_lines: int | None = None,
    text_column: str = "text",
) -> dict[str, float | int]:
    """Compression of ``tok`` on held-out text.

    files_or_texts: a path object, or strings that are each an existing file/folder, a
        glob that matches files, or otherwise a text to measure.
    Returns vocab_size, documents, bytes (UTF-8), words (whitespace-separated),
    tokens, bytes_per_token, tokens_per_word and unk_fraction.
    """
    if isinstance(files_or_texts, (str, os.PathLike)):
        files_or_texts = [files_or_texts]
    texts: Iterator[str] = itertools.chain.from_iterable(
        iter_texts(item, text_column=text_column) if _is_path(item) else [os.fspath(item)] for item in files_or_texts
    )
    if max_lines is not None:
        texts = itertools.islice(texts, max_lines)
    n_docs = n_bytes = n_words = n_tokens = n_unk = 0
    unk_id = tok.unk_token_id
    for batch in _batches(texts, 256):
        ids = tok(batch, add_special_tokens=False)["input_ids"]
        n_docs += len(batch)
        n_bytes += sum(len(t.encode("utf-8")) for t in batch)
        n_words += sum(len(t.split()) for t in batch)
        n_tokens += sum(len(x) for x in ids)
        if unk_id is not None:
            n_unk += sum(x.count(unk_id) for x in ids)
    if n_tokens == 0:
        raise UserError("no text to measure the tokenizer on; give non-empty held-out files")
    return {
        "vocab_size": len(tok),
        "documents": n_docs,
        "bytes": n_bytes,
        "words": n_words,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / n_tokens,
        "tokens_per_word": n_tokens / max(n_words, 1),
        "unk_fraction": n_unk / n_tokens,
    }


def _is_path(item: str | os.PathLike) -> bool:
    if isinstance(item, os.PathLike):
        return True
    if "\n" in item or len(item) > 4096:
        return False
    return os.path.exists(os.path.expanduser(item)) or (glob.has_magic(item) and bool(glob.glob(item, recursive=True)))


# ----------------------------------------------------------------------------------
# Loading


def default_tokenizer_path() -> Path:
    """Folder of the shipped default tokenizer (byte-level BPE, 8192 entries).

    Installed, it is the package ``lmssl._default_tokenizer`` (the repository's
    top-level ``tokenizer/`` folder, mapped in pyproject.toml); in a source checkout
    it is ``<repo>/tokenizer``.
    """
    try:
        installed = importlib.resources.files("lmssl._default_tokenizer")
    except ModuleNotFoundError:
        installed = None
    if isinstance(installed, Path) and (installed / "tokenizer.json").is_file():
        return installed
    return Path(__file__).resolve().parents[2] / "tokenizer"


def load_tokenizer(name_or_path: str | os.PathLike = "default") -> PreTrainedTokenizerBase:
    """Load a tokenizer: "default" (the shipped one), a local folder written by
    :func:`train_tokenizer` or ``save_pretrained``, or a Hugging Face Hub name such as
    "gpt2", "bert-base-cased" or "HuggingFaceTB/SmolLM2-135M" (needs network access).
    """
    from transformers import AutoTokenizer

    name = os.fspath(name_or_path)
    if name == "default":
        path = default_tokenizer_path()
        if not (path / "tokenizer.json").is_file():
            raise UserError(
                f"the default tokenizer is missing from {path}; reinstall lmssl or retrain it with `{RETRAIN_DEFAULT}`"
            )
        return AutoTokenizer.from_pretrained(os.fspath(path))
    local = Path(name).expanduser()
    if local.is_dir():
        try:
            return AutoTokenizer.from_pretrained(os.fspath(local))
        except (OSError, ValueError) as e:
            raise UserError(
                f"{name} holds no loadable tokenizer ({_one_line(e)}); train one with `lmssl tokenizer train`"
            ) from None
    if local.exists() or _looks_like_local_path(name):
        raise UserError(
            f"tokenizer folder {name} does not exist; "
            "pass 'default', a folder made by `lmssl tokenizer train`, or a Hub name"
        )
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load tokenizer {name!r} from the Hugging Face Hub ({_one_line(e)}); "
            "check the name and network, or pass 'default' or a local folder"
        ) from None


def _looks_like_local_path(name: str) -> bool:
    """Hub names are "name" or "org/name"; anything else is meant as a filesystem path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


# ----------------------------------------------------------------------------------
# The run's tokenizer: named, or trained on the run's data (data.tokenizer=auto)

AUTO = "auto"
AUTO_FOLDER = "tokenizer"  # RUN_DIR/tokenizer/
AUTO_RECORD = "lmssl_tokenizer.json"  # in that folder: what it was trained with and on
AUTO_MAX_DOCUMENTS = 1_000_000  # training documents read for an auto tokenizer (the first ones, in order)
FIT_SAMPLE_BYTES = 256 * 1024  # text measured, on each side, for the default-tokenizer fit check
# Below this fraction of the bundled corpus's bytes per token, the default tokenizer is said to fit
# the data badly. Measured with it (4.35 bytes/token on the bundled validation text): the bundled
# genre task 4.33 (100%); modern English: the GPL-3 text 2.86 (66%), the Jargon File 2.65 (61%),
# lmssl's design notes 2.38 (55%); Python source 1.69 (39%).
FIT_WARNING_RATIO = 0.75


def resolve_tokenizer(cfg, out_dir: str | os.PathLike, log=print, *, may_train: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer of the run in ``out_dir`` (a :class:`~lmssl.config.RunConfig`'s ``data``).

    ``data.tokenizer=auto``: ``out_dir/tokenizer/`` when it holds the tokenizer trained for
    these settings; otherwise (``may_train``, the trainer) one is trained there now from the
    training documents. It is never retrained under a run that has checkpoints (their ids
    depend on it) unless ``train.overwrite`` starts that run over. ``may_train=False``
    (commands that read a finished run: export, probe, generate) only loads it.

    Any other value is loaded by :func:`load_tokenizer`; when it is ``default`` and the run
    reads its own data (``data.train_files`` or ``data.dataset``), the trainer measures the
    fit (:func:`default_fit_note`) and logs the note, if any.
    """
    d = cfg.data
    if d.tokenizer != AUTO:
        tok = load_tokenizer(d.tokenizer)
        if may_train and d.tokenizer == "default" and (d.train_files or d.dataset):
            note = default_fit_note(tok, d)
            if note:
                log(note)
        return tok
    folder = Path(out_dir) / AUTO_FOLDER
    wanted = _auto_record(d)
    if _auto_matches(folder, wanted):
        return load_tokenizer(folder)
    if not may_train:
        raise UserError(f"{out_dir} was trained with data.tokenizer=auto but {folder} is missing or was made for other "
                        "settings; restore that folder (the run's ids depend on it)")
    checkpoints = Path(out_dir) / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()) and not cfg.train.overwrite:
        raise UserError(f"{out_dir} holds checkpoints but no tokenizer trained for these data settings in {folder}; "
                        "restore the folder, choose another train.output_dir, or pass train.overwrite=true")
    with _main_process_first():
        if not _auto_matches(folder, wanted):  # another process may have trained it meanwhile
            _train_auto(d, folder, wanted, log)
    return load_tokenizer(folder)


def _auto_record(d) -> dict:
    """What an auto tokenizer is trained with and on (the data settings that pick documents)."""
    return {"model": d.tokenizer_model, "vocab_size": d.tokenizer_vocab_size, "train_files": list(d.train_files),
            "dataset": d.dataset, "dataset_config": d.dataset_config, "train_split": d.train_split,
            "validation_files": list(d.validation_files), "validation_split": d.validation_split,
            "validation_fraction": d.validation_fraction, "text_column": d.text_column,
            "max_documents": d.max_documents}


def _auto_matches(folder: Path, wanted: dict) -> bool:
    try:
        return (folder / "tokenizer.json").is_file() and json.loads((folder / AUTO_RECORD).read_text())["settings"] == wanted
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _train_auto(d, folder: Path, record: dict, log) -> None:
    """Train the auto tokenizer on the run's training documents into ``folder`` (atomically)."""
    import shutil

    from lmssl.data.text import load_documents

    if d.tokenizer_model not in MODELS:
        raise UserError(f"data.tokenizer_model must be one of {', '.join(MODELS)}, got {d.tokenizer_model!r}")
    if d.tokenizer_vocab_size < MIN_VOCAB_SIZE[d.tokenizer_model]:
        raise UserError(f"data.tokenizer_vocab_size={d.tokenizer_vocab_size} is too small for {d.tokenizer_model}; "
                        f"use at least {MIN_VOCAB_SIZE[d.tokenizer_model]}")
    counted = {"documents": 0, "bytes": 0}

    def texts() -> Iterator[str]:
        docs = load_documents(d, "train", streaming=True)
        for row in itertools.islice(docs, AUTO_MAX_DOCUMENTS):
            text = row["text"]
            if isinstance(text, str) and text.strip():
                counted["documents"] += 1
                counted["bytes"] += len(text.encode("utf-8"))
                yield text

    start = time.perf_counter()
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = train_from_texts(_non_empty(texts(), "the training data"), d.tokenizer_vocab_size, d.tokenizer_model, tmp)
        (tmp / AUTO_RECORD).write_text(json.dumps({"settings": record, **counted}, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data.tokenizer=auto: trained a {d.tokenizer_model} tokenizer of {len(tok)} entries on {counted['documents']:,} "
        f"documents ({counted['bytes'] / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s -> {folder}")


def _main_process_first():
    """Under several processes, the main one first (it trains; the others then find the folder)."""
    from contextlib import nullcontext

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


def _bytes_per_token(tok: PreTrainedTokenizerBase, texts: Iterable[str], limit: int) -> float:
    """UTF-8 bytes per token over the first ``limit`` bytes of whole documents of ``texts``."""
    sample, size = [], 0
    for text in texts:
        if isinstance(text, str) and text.strip():
            sample.append(text)
            size += len(text.encode("utf-8"))
            if size >= limit:
                break
    if not sample:
        return 0.0
    tokens = sum(len(ids) for ids in tok(sample, add_special_tokens=False)["input_ids"])
    return size / max(tokens, 1)


def default_fit_note(tok: PreTrainedTokenizerBase, d) -> str:
    """One line when the default tokenizer spends far more tokens per byte on the run's
    training data than on the bundled corpus it was trained on (bytes per token below
    :data:`FIT_WARNING_RATIO` of the bundled figure, on :data:`FIT_SAMPLE_BYTES` of each); "" otherwise."""
    from lmssl.data.text import BUNDLED, load_documents

    theirs = _bytes_per_token(tok, (row["text"] for row in load_documents(d, "train", streaming=True)),
                              FIT_SAMPLE_BYTES)
    home = _bytes_per_token(tok, iter_texts(BUNDLED["train"]), FIT_SAMPLE_BYTES)
    if not theirs or theirs >= FIT_WARNING_RATIO * home:
        return ""
    return (f"note: the default tokenizer (trained on the bundled King James text) makes {theirs:.2f} bytes per token "
            f"of this data against {home:.2f} there ({theirs / home:.0%}), so each sequence holds less text; "
            "data.tokenizer=auto trains one on this data before pretraining")


# ----------------------------------------------------------------------------------
# Command line: `lmssl tokenizer train ...`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `tokenizer` sub-commands to ``parser`` (the `lmssl tokenizer` parser)."""
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    train = commands.add_parser(
        "train",
        help="train a bpe, unigram or wordpiece tokenizer on text files",
        description="Train a tokenizer on text files and save it as a transformers tokenizer folder.",
    )
    add = train.add_argument
    add("--files", nargs="+", required=True, metavar="PATH",
        help="training text: files, folders or globs (.txt: one document per line; .jsonl: a text field)")
    add("--vocab-size", type=int, default=8000, help="vocabulary entries, special tokens included (default: 8000)")
    add("--model", choices=MODELS, default="bpe", help="tokenizer model (default: bpe)")
    add("--out", required=True, metavar="DIR", help="folder to save the tokenizer into (created if missing)")
    add("--validation-files", nargs="+", metavar="PATH",
        help="held-out text for the summary (default: the first 200 lines of the first training file)")
    add("--text-column", default="text", help="field holding the text in .jsonl/.json files (default: text)")
    add("--min-frequency", type=int, default=2, help="minimum count for a merge or word (bpe, wordpiece; default: 2)")
    add("--max-lines", type=int, default=None, help="read at most this many training documents")
    add("--pad-to-multiple-of", type=int, default=None, metavar="N", help="round the vocab size up to a multiple of N")


def run(args: argparse.Namespace) -> int:
    """Run the parsed `lmssl tokenizer` command; returns the exit code."""
    if args.tokenizer_command != "train":
        raise UserError(f"unknown tokenizer command {args.tokenizer_command!r}; use `lmssl tokenizer train`")
    # Resolve the held-out files first, so a typo fails before minutes of training.
    if args.validation_files:
        held_out, limit, label = resolve_files(args.validation_files, "--validation-files"), None, " ".join(args.validation_files)
    else:
        first = resolve_files(args.files)[0]
        held_out, limit, label = [first], 200, f"first 200 lines of {first} (seen in training)"
    start = time.perf_counter()
    tok = train_tokenizer(
        args.files,
        args.vocab_size,
        args.model,
        args.out,
        min_frequency=args.min_frequency,
        max_lines=args.max_lines,
        text_column=args.text_column,
        pad_to_multiple_of=args.pad_to_multiple_of,
    )
    seconds = time.perf_counter() - start
    stats = tokenizer_stats(tok, held_out, max_lines=limit, text_column=args.text_column)
    print(
        f"tokenizer    {args.model}, vocab {stats['vocab_size']} -> {args.out}\n"
        f"trained in   {seconds:.1f} s\n"
        f"measured on  {label}: {stats['documents']} documents, {stats['bytes']:,} bytes\n"
        f"bytes/token  {stats['bytes_per_token']:.3f}\n"
        f"tokens/word  {stats['tokens_per_word']:.3f}\n"
        f"unknown      {100 * stats['unk_fraction']:.2f}% of tokens"
    )
    return 0
