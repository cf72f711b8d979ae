"""Corpora as token streams, a deterministic train/validation split, and a resumable batch sampler.

Byte-level tokens: a text's UTF-8 bytes are tokens 0-255, plus three specials:

| id | name | use |
| --- | --- | --- |
| 256 | BOS | starts every document |
| 257 | EOS | ends every document |
| 258 | PAD | reserved (never produced: batches are windows of the stream, so nothing is padded) |

Documents are encoded [BOS, bytes..., EOS] and concatenated into one stream per split; a batch is a set
of random windows of that stream (windows may cross document boundaries, as in GPT-2 style training).

Sources (`load_corpus`):
- None: the Python standard library's own sources on this machine, every `*.py` file under
  `sysconfig.get_paths()["stdlib"]` except `site-packages`/`dist-packages` (installed third-party code
  varies by machine); about 1,800 files and 34 MB on CPython 3.11, no download.
- a text file (.txt, .md, .py or anything else that is not .jsonl/.npy/.bin): one document.
- a .jsonl file: one document per line, its "text" field.
- a directory: every .txt/.md/.py/.jsonl file under it (recursively), or every .npy/.bin file (a
  directory may not mix text and token files).
- .npy / .bin files: pre-tokenised uint16 or uint32 token arrays, memory-mapped (.bin has no header: its
  dtype is the `token_dtype` argument). Ids must be < the model's vocab_size.

With a tokenizer (`train.tokenizer`, `--tokenizer PATH/tokenizer.json`) the same text sources are tokenised
by it instead of as bytes (documents [BOS, ids..., EOS] with the tokenizer's BOS and EOS), once: the
result is cached.

Split: each document goes to validation when the SHA-256 of its name (the file's path relative to the
corpus root, plus ":<line>" for a .jsonl record) falls in the first `val_fraction` of the hash range, so
the split is the same on every machine and run and independent of file order. A corpus of exactly one
document (a single text file, a single token array) is split by position instead: the last
`val_fraction` of its tokens are validation. When a small corpus's documents all hash into one split, the
document with the lowest hash goes to validation (or, if all hashed there, the highest to train): still a
function of the names alone, and `Corpus.documents` reports the counts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterator
from typing import Any

import numpy as np

from train import tokenizer as tokenizer_lib
from train.tokenizer import TextTokenizer

BOS, EOS, PAD = 256, 257, 258
BYTE_VOCAB_SIZE = 259
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
TOKEN_SUFFIXES = (".npy", ".bin")
TOKEN_DTYPES = ("uint16", "uint32")
# Directories of the stdlib tree that hold installed third-party packages, not the standard library.
_NOT_STDLIB = ("site-packages", "dist-packages", "__pycache__")


class CorpusError(ValueError):
    """A corpus that cannot be used: missing path, unreadable file, empty or too small split."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Two token streams and where they came from.

    Attributes:
      train, validation: [n] uint16/uint32 token ids (np.memmap for a single pre-tokenised file).
      source: the path read, or "stdlib:<dir>".
      byte_level: tokens are this module's byte tokens, so bits per byte can be reported.
      documents: (train, validation) document counts.
      tokenizer: the tokenizer file the text was tokenised with (`train.tokenizer`), or None.
      validation_bytes: with a tokenizer, the UTF-8 bytes the validation tokens decode to (bits per byte
        are then val_loss * len(validation) / validation_bytes / ln 2); None otherwise.
    """

    train: np.ndarray
    validation: np.ndarray
    source: str
    byte_level: bool
    documents: tuple[int, int]
    tokenizer: str | None = None
    validation_bytes: int | None = None

    @property
    def tokens_per_byte(self) -> float | None:
        """Validation tokens per UTF-8 byte of their text (tokenised corpora only)."""
        return None if self.validation_bytes is None else len(self.validation) / self.validation_bytes

    def summary(self) -> dict[str, Any]:
        summary = {
            "source": self.source,
            "byte_level": self.byte_level,
            "train_tokens": len(self.train),
            "validation_tokens": len(self.validation),
            "train_documents": self.documents[0],
            "validation_documents": self.documents[1],
        }
        if self.tokenizer is not None:
            summary.update(tokenizer=self.tokenizer, validation_bytes=self.validation_bytes)
        return summary


def encode(text: str | bytes) -> np.ndarray:
    """[BOS, UTF-8 bytes..., EOS] as uint16 ([len + 2])."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.concatenate([[BOS], np.frombuffer(data, np.uint8), [EOS]]).astype(np.uint16)


def decode(tokens: Any) -> str:
    """Bytes of the non-special tokens as UTF-8 text (invalid sequences replaced); specials dropped."""
    ids = np.asarray(tokens).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def in_validation(name: str, val_fraction: float) -> bool:
    """Whether the document called `name` belongs to the validation split (hash of the name)."""
    return _name_hash(name) < val_fraction * 2**64


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: pathlib.Path | None = None) -> list[pathlib.Path]:
    """The standard library's .py files, sorted, without installed third-party packages."""
    root = stdlib_root() if root is None else root
    return sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(_NOT_STDLIB))


def load_corpus(
    path: str | None,
    *,
    val_fraction: float,
    vocab_size: int,
    token_dtype: str = "uint16",
    tokenizer: TextTokenizer | str | None = None,
) -> Corpus:
    """Read, tokenise and split a corpus (see the module docstring). Raises CorpusError on bad input.

    tokenizer: tokenise the text with it (or the tokenizer file at this path) instead of as bytes
      (`train.tokenizer`; cached, so a second load
    of the same corpus reads the cache). Token files (.npy/.bin) are already tokenised and are refused.
    """
    if not 0 < val_fraction < 1:
        raise CorpusError(f"val_fraction={val_fraction!r} must be in (0, 1)")
    if token_dtype not in TOKEN_DTYPES:
        raise CorpusError(f"token_dtype={token_dtype!r} must be one of {TOKEN_DTYPES}")
    if isinstance(tokenizer, str):
        try:
            tokenizer = TextTokenizer(tokenizer)
        except tokenizer_lib.TokenizerError as error:
            raise CorpusError(str(error)) from None
    if tokenizer is not None:
        corpus = _tokenised_corpus(path, val_fraction, tokenizer)
        if vocab_size < tokenizer.vocab_size:
            raise CorpusError(
                f"vocab_size={vocab_size} is too small for tokenizer {str(tokenizer.path)!r}: it needs "
                f"{tokenizer.vocab_size} ({tokenizer.size} ids + BOS, EOS, PAD)"
            )
    elif path is None:
        root = stdlib_root()
        files = stdlib_files(root)
        if not files:
            raise CorpusError(f"no .py files found under the standard library directory {root}")
        corpus = _split_documents(_text_documents(root, files), val_fraction, source=f"stdlib:{root}")
    else:
        target = pathlib.Path(path)
        if not target.exists():
            raise CorpusError(f"data path {str(target)!r} does not exist")
        if target.is_dir():
            corpus = _load_directory(target, val_fraction, token_dtype)
        elif target.suffix in TOKEN_SUFFIXES:
            corpus = _split_by_position(_read_tokens(target, token_dtype), val_fraction, source=str(target))
        elif target.suffix == ".jsonl":
            corpus = _split_documents(_text_documents(target.parent, [target]), val_fraction, source=str(target))
        else:
            text = encode(_read_bytes(target))
            corpus = _split_by_position(text, val_fraction, source=str(target), byte_level=True)
    if corpus.byte_level and not (np.any(corpus.train < BOS) or np.any(corpus.validation < BOS)):
        raise CorpusError(f"{corpus.source}: the corpus is empty (its documents hold no text)")
    if corpus.byte_level and vocab_size < BYTE_VOCAB_SIZE:
        raise CorpusError(f"vocab_size={vocab_size} is too small for byte tokens: need >= {BYTE_VOCAB_SIZE}")
    for name, stream in (("train", corpus.train), ("validation", corpus.validation)):
        if len(stream) and int(stream.max()) >= vocab_size:
            raise CorpusError(
                f"{corpus.source}: {name} tokens go up to {int(stream.max())}, not < vocab_size={vocab_size}"
            )
    return corpus


def _load_directory(root: pathlib.Path, val_fraction: float, token_dtype: str) -> Corpus:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    text_files = [p for p in files if p.suffix in TEXT_SUFFIXES]
    token_files = [p for p in files if p.suffix in TOKEN_SUFFIXES]
    if text_files and token_files:
        raise CorpusError(
            f"data directory {str(root)!r} mixes text files ({text_files[0].name}, ...) and token arrays "
            f"({token_files[0].name}, ...); use one kind"
        )
    if token_files:
        # Several arrays are concatenated into memory; give one large file to keep it memory-mapped.
        docs = ((p.relative_to(root).as_posix(), _read_tokens(p, token_dtype)) for p in token_files)
        return _split_documents(docs, val_fraction, source=str(root), byte_level=False)
    if not text_files:
        raise CorpusError(f"data directory {str(root)!r} holds no {'/'.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)} files")
    return _split_documents(_text_documents(root, text_files), val_fraction, source=str(root))


def _read_bytes(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise CorpusError(f"cannot read data file {str(path)!r}: {err}") from err


def _read_tokens(path: pathlib.Path, token_dtype: str) -> np.ndarray:
    """A memory-mapped 1-D uint16/uint32 token array from a .npy or headerless .bin file."""
    try:
        is_npy = path.suffix == ".npy"
        tokens = np.load(path, mmap_mode="r") if is_npy else np.memmap(path, dtype=token_dtype, mode="r")
    except (OSError, ValueError) as err:
        raise CorpusError(f"cannot read token file {str(path)!r}: {err}") from err
    if tokens.dtype not in (np.uint16, np.uint32):
        raise CorpusError(f"token file {str(path)!r} has dtype {tokens.dtype}; expected uint16 or uint32")
    if tokens.ndim != 1:
        raise CorpusError(f"token file {str(path)!r} has shape {tokens.shape}; expected a 1-D array")
    return tokens


def _text_documents(root: pathlib.Path, files: list[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, [BOS, bytes..., EOS]) per document: a file, or a record of a .jsonl file."""
    for name, data in _raw_documents(root, files):
        yield name, encode(data)


def _raw_documents(root: pathlib.Path, files: list[pathlib.Path]) -> Iterator[tuple[str, bytes]]:
    """(name, UTF-8 text) per document: a file, or a record of a .jsonl file."""
    for path in files:
        name = path.relative_to(root).as_posix()
        data = _read_bytes(path)
        if path.suffix != ".jsonl":
            yield name, data
            continue
        for line_number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as err:
                raise CorpusError(f'{path}:{line_number}: expected a JSON object with a "text" field') from err
            if not isinstance(text, str):
                raise CorpusError(f'{path}:{line_number}: "text" must be a string, got {type(text).__name__}')
            yield f"{name}:{line_number}", text.encode("utf-8")


def _tokenised_corpus(path: str | None, val_fraction: float, tokenizer: TextTokenizer) -> Corpus:
    """The text corpus at `path` (None: the standard library) through `tokenizer`, from the cache if there."""
    if path is None:
        root = stdlib_root()
        files, source = stdlib_files(root), f"stdlib:{root}"
    else:
        target, source = pathlib.Path(path), str(path)
        if not target.exists():
            raise CorpusError(f"data path {str(target)!r} does not exist")
        if target.is_dir():
            root, files = target, sorted(p for p in target.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        elif target.suffix in TOKEN_SUFFIXES:
            files = []
        else:
            root, files = target.parent, [target]
        if not files:
            raise CorpusError(
                f"data path {str(target)!r} holds no text ({'/'.join(TEXT_SUFFIXES)} files) for tokenizer "
                f"{str(tokenizer.path)!r}: token files (.npy/.bin) are tokenised already; drop --tokenizer for them"
            )
    documents = list(_raw_documents(root, files))
    cached = tokenizer_lib.cache_dir() / f"{tokenizer_lib.corpus_key(documents, tokenizer, val_fraction)}.npz"
    if cached.is_file():
        with np.load(cached) as arrays:
            train, validation = arrays["train"], arrays["validation"]
            counts, validation_bytes = tuple(int(c) for c in arrays["documents"]), int(arrays["validation_bytes"])
    else:
        names = [name for name, _ in documents]
        encoded = tokenizer.encode_batch([data.decode("utf-8", errors="replace") for _, data in documents])
        split = _split_documents(zip(names, encoded, strict=True), val_fraction, source=source, byte_level=False)
        train, validation, counts = split.train, split.validation, split.documents
        validation_bytes = len(tokenizer.decode(validation).encode("utf-8"))
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.partial.npz")  # written whole, then renamed: never half read
        np.savez(partial, train=train, validation=validation, documents=counts, validation_bytes=validation_bytes)
        os.replace(partial, cached)
    if validation_bytes == 0:
        raise CorpusError(f"{source}: the validation split decodes to no text through {str(tokenizer.path)!r}")
    return Corpus(train, validation, source, False, counts, str(tokenizer.path), validation_bytes)


def _split_documents(
    documents: Iterator[tuple[str, np.ndarray]], val_fraction: float, *, source: str, byte_level: bool = True
) -> Corpus:
    hashed = [(_name_hash(name), tokens) for name, tokens in documents]  # in corpus order
    if not hashed:
        raise CorpusError(f"{source}: the corpus holds no documents")
    if len(hashed) == 1:
        return _split_by_position(hashed[0][1], val_fraction, source=source, byte_level=byte_level)
    is_validation = [digest < val_fraction * 2**64 for digest, _ in hashed]
    if not any(is_validation) or all(is_validation):  # a small corpus: both splits get a document
        digests = [digest for digest, _ in hashed]
        moved = digests.index(min(digests)) if not any(is_validation) else digests.index(max(digests))
        is_validation[moved] = not is_validation[moved]
    validation = [tokens for (_, tokens), held_out in zip(hashed, is_validation, strict=True) if held_out]
    train = [tokens for (_, tokens), held_out in zip(hashed, is_validation, strict=True) if not held_out]
    return Corpus(
        train=np.concatenate(train),
        validation=np.concatenate(validation),
        source=source,
        byte_level=byte_level,
        documents=(len(train), len(validation)),
    )


def _split_by_position(tokens: np.ndarray, val_fraction: float, *, source: str, byte_level: bool = False) -> Corpus:
    if len(tokens) == 0:
        raise CorpusError(f"{source}: the corpus is empty")
    cut = len(tokens) - round(len(tokens) * val_fraction)
    return Corpus(train=tokens[:cut], validation=tokens[cut:], source=source, byte_level=byte_level, documents=(1, 1))


def check_fits(corpus: Corpus, window: int) -> None:
    """Both splits must hold at least one window of `window` tokens (context_length + 1)."""
    for name, stream in (("train", corpus.train), ("validation", corpus.validation)):
        if len(stream) < window:
            raise CorpusError(
                f"{corpus.source}: the {name} split has {len(stream)} tokens, fewer than one window of "
                f"context_length + 1 = {window}; use more data or a shorter context_length"
            )


class BatchSampler:
    """Random windows of a token stream, drawn by an explicit RNG whose state can be saved and restored.

    `next()` returns [batch_size, window] int32 token windows, each starting at a uniform position of the
    stream. `state()` is JSON-serialisable; `restore(state)` makes the following batches exactly those the
    saved sampler would have drawn.
    """

    def __init__(self, tokens: np.ndarray, *, window: int, batch_size: int, seed: int):
        if len(tokens) < window:
            raise CorpusError(f"the stream has {len(tokens)} tokens, fewer than one window of {window}")
        self._tokens = tokens
        self._window = window
        self._batch_size = batch_size
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def next(self) -> np.ndarray:
        starts = self._rng.integers(0, len(self._tokens) - self._window + 1, size=self._batch_size)  # [B]
        offsets = starts[:, None] + np.arange(self._window)[None, :]  # [B, window]
        return np.asarray(self._tokens[offsets], dtype=np.int32)  # [B, window]

    def state(self) -> dict[str, Any]:
        return self._rng.bit_generator.state

    def restore(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state


def evaluation_batches(tokens: np.ndarray, *, window: int, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """The same `num_batches` [batch_size, window] int32 batches every evaluation: windows at evenly spaced
    starts over the whole validation stream (overlapping when the stream is short)."""
    count = batch_size * num_batches
    starts = np.linspace(0, len(tokens) - window, count).round().astype(np.int64)  # [count]
    offsets = starts[:, None] + np.arange(window)[None, :]  # [count, window]
    windows = np.asarray(tokens[offsets], dtype=np.int32)  # [count, window]
    return list(windows.reshape(num_batches, batch_size, window))  # num_batches x [B, window]
