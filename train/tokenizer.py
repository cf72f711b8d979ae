"""A Hugging Face `tokenizers` file as the run's tokenizer: `python -m train --tokenizer PATH/tokenizer.json`.

The file is read from disk (nothing is downloaded). Its V token ids keep their values; three ids are added
after them, as the byte tokens add three after the 256 bytes (`train.data`):

| id | name | use |
| --- | --- | --- |
| 0 .. V-1 | the tokenizer's | text |
| V | BOS | starts every document |
| V + 1 | EOS | ends every document |
| V + 2 | PAD | reserved (fills the unused end of `train.sample`'s window; never trained on) |

so the model's vocab_size is V + 3 (`python -m train` sets it when --vocab_size is not given). A
document is [BOS, tokenizer.encode(text).ids..., EOS], without the tokenizer's own post-processing
(`add_special_tokens=False`), so the ids are the same whatever template the file carries.

A corpus is tokenised once: the streams are cached under `cache_dir()` in a file named by the SHA-256 of
the corpus (every document's name and bytes), of the tokenizer file and of the split fraction, so a
resumed run, or another run on the same corpus and tokenizer, reads them back. The run directory keeps a
copy of the tokenizer file (`tokenizer.json`), which `train.sample` encodes prompts and decodes with.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
from collections.abc import Iterable

import numpy as np

RUN_DIR_FILE = "tokenizer.json"  # the copy in a run directory


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used: missing, unreadable, not a `tokenizers` JSON file."""


class TextTokenizer:
    """A `tokenizers.Tokenizer` loaded from `path`, with the BOS, EOS and PAD ids this package adds."""

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer  # the Rust extension loads only for runs that use it

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer={str(self.path)!r} is not a file; expected a tokenizers JSON file")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as error:  # the extension raises a bare Exception for a malformed file
            raise TokenizerError(
                f"tokenizer={str(self.path)!r} is not a Hugging Face tokenizers file "
                f"(tokenizer.json, as Tokenizer.save writes): {error}"
            ) from None
        self.size = self.tokenizer.get_vocab_size(with_added_tokens=True)  # V
        self.bos, self.eos, self.pad = self.size, self.size + 1, self.size + 2
        self.vocab_size = self.size + 3
        # uint16 holds the ids of vocabularies up to 65533 words (+ 3): half the cache and memory.
        self.dtype = np.uint16 if self.vocab_size <= 2**16 else np.uint32
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str | bytes) -> np.ndarray:
        """[BOS, ids..., EOS] of one document ([n + 2], uint16 or uint32)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray([self.bos, *ids, self.eos], self.dtype)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of many documents at once (the library parallelises over them)."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray([self.bos, *e.ids, self.eos], self.dtype) for e in encodings]

    def decode(self, tokens: Iterable[int]) -> str:
        """The text of the tokenizer's ids; BOS, EOS and PAD dropped."""
        ids = [int(t) for t in np.asarray(tokens).reshape(-1) if int(t) < self.size]
        return self.tokenizer.decode(ids)


def store(path: str | os.PathLike, run_dir: str | os.PathLike) -> pathlib.Path:
    """Copy the tokenizer file at `path` into `run_dir` (once: a resumed run checks it is the same file)."""
    target = pathlib.Path(run_dir) / RUN_DIR_FILE
    if not target.exists():
        shutil.copyfile(path, target)
    elif target.read_bytes() != pathlib.Path(path).read_bytes():
        raise TokenizerError(f"{str(target)!r} differs from tokenizer={str(path)!r}: the run used another tokenizer")
    return target


def cache_dir() -> pathlib.Path:
    """Where tokenised corpora are cached: $OMNIMOE_TOKEN_CACHE, else ~/.cache/omnimoe-jax/tokens."""
    override = os.environ.get("OMNIMOE_TOKEN_CACHE")
    return pathlib.Path(override) if override else pathlib.Path.home() / ".cache" / "omnimoe-jax" / "tokens"


def corpus_key(documents: list[tuple[str, bytes]], tokenizer: TextTokenizer, val_fraction: float) -> str:
    """SHA-256 of every document's name and bytes, the tokenizer file and the split fraction."""
    digest = hashlib.sha256()
    for name, data in documents:
        for part in (name.encode("utf-8"), data):
            digest.update(len(part).to_bytes(8, "little"))  # lengths first: ("ab", "c") != ("a", "bc")
            digest.update(part)
    digest.update(tokenizer.sha256.encode())
    digest.update(repr(float(val_fraction)).encode())
    return digest.hexdigest()
