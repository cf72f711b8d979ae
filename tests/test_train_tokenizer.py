"""`python -m train --tokenizer PATH/tokenizer.json`: a BPE trained here with the `tokenizers` library on the
test corpus, through train -> resume -> sample."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
from test_train_loop import SHRUNK
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from train import cli, sample
from train import tokenizer as tokenizer_lib
from train.data import CorpusError, load_corpus, stdlib_root
from train.loop import load_config, run
from train.metrics import read_metrics
from train.tokenizer import TextTokenizer, TokenizerError

CORPUS_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
    """Four standard-library files: a corpus of four documents, split by their names' hashes."""
    root = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_FILES:
        (root / name.replace("/", "_")).write_bytes((stdlib_root() / name).read_bytes())
    return root


@pytest.fixture(scope="module")
def bpe_file(corpus_dir, tmp_path_factory) -> pathlib.Path:
    """A byte-level BPE of 400 ids trained on the corpus, saved as tokenizer.json."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator((p.read_text() for p in sorted(corpus_dir.iterdir())), trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    bpe.save(str(path))
    return path


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch) -> pathlib.Path:
    cache = tmp_path / "token-cache"
    monkeypatch.setenv("OMNIMOE_TOKEN_CACHE", str(cache))
    return cache


def test_documents_are_bos_ids_eos_and_decode_back(bpe_file):
    tokenizer = TextTokenizer(bpe_file)
    assert (tokenizer.size, tokenizer.bos, tokenizer.eos, tokenizer.pad, tokenizer.vocab_size) == (
        400,
        400,
        401,
        402,
        403,
    )
    text = "def parse(s):\n    return s.split()\n"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos and ids[-1] == tokenizer.eos and ids.dtype == np.uint16
    assert len(ids) - 2 < len(text.encode())  # BPE merges: fewer tokens than bytes
    assert tokenizer.decode(ids) == text


def test_the_corpus_is_tokenised_once_and_cached(bpe_file, corpus_dir, token_cache, monkeypatch):
    tokenizer = TextTokenizer(bpe_file)
    first = load_corpus(str(corpus_dir), val_fraction=0.25, vocab_size=403, tokenizer=tokenizer)
    assert [p.suffix for p in token_cache.iterdir()] == [".npz"]
    assert first.byte_level is False and first.documents[0] >= 1 and first.documents[1] >= 1
    assert first.validation_bytes == len(tokenizer.decode(first.validation).encode())
    assert 0.1 < first.tokens_per_byte < 1  # a BPE of 400 ids: several bytes per token
    # A second load reads the cache: the tokenizer is not called again.
    with monkeypatch.context() as patch:
        patch.setattr(TextTokenizer, "encode_batch", lambda *a: pytest.fail("tokenised again"))
        second = load_corpus(str(corpus_dir), val_fraction=0.25, vocab_size=403, tokenizer=tokenizer)
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.validation, first.validation)
    assert second.summary() == first.summary()
    # Another split fraction (or corpus, or tokenizer file) is another key.
    load_corpus(str(corpus_dir), val_fraction=0.5, vocab_size=403, tokenizer=tokenizer)
    assert len(list(token_cache.iterdir())) == 2


def test_bad_tokenizer_files_are_named(tmp_path, corpus_dir, bpe_file, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match=f"tokenizer='{bad}' is not a Hugging Face tokenizers file"):
        TextTokenizer(bad)
    with pytest.raises(TokenizerError, match=f"tokenizer='{tmp_path / 'absent.json'}' is not a file"):
        TextTokenizer(tmp_path / "absent.json")
    with pytest.raises(CorpusError, match="is not a Hugging Face tokenizers file"):
        load_corpus(str(corpus_dir), val_fraction=0.25, vocab_size=403, tokenizer=str(bad))
    with pytest.raises(CorpusError, match=r"vocab_size=259 is too small for tokenizer .* it needs 403"):
        load_corpus(str(corpus_dir), val_fraction=0.25, vocab_size=259, tokenizer=str(bpe_file))
    tokens = tmp_path / "ids.npy"
    np.save(tokens, np.arange(100, dtype=np.uint16))
    with pytest.raises(CorpusError, match=r"token files .* are tokenised already"):
        load_corpus(str(tokens), val_fraction=0.25, vocab_size=403, tokenizer=str(bpe_file))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--print-config", f"--tokenizer={bad}"])
    assert exit_info.value.code == 2
    assert f"error: tokenizer='{bad}' is not a Hugging Face tokenizers file" in capsys.readouterr().err


def test_train_resume_sample_through_the_tokenizer(bpe_file, corpus_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *SHRUNK, f"--data={corpus_dir}", f"--tokenizer={bpe_file}"]
    # The vocabulary is sized from the tokenizer.
    assert cli.main([*args, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["vocab_size"] == 403 and printed["tokenizer"] == str(bpe_file)
    printed.pop("parameters"), printed.pop("flops")  # the counts --print-config adds to the config
    from train.config import TrainConfig

    config = TrainConfig.from_dict(printed)
    run(config, run_dir, stop_at_step=6)  # a run stopped early at its checkpoint ...
    assert (run_dir / tokenizer_lib.RUN_DIR_FILE).read_bytes() == bpe_file.read_bytes()
    assert cli.main(["--run-dir", str(run_dir), "--resume"]) == 0  # ... and resumed to the end
    assert load_config(run_dir) == config
    records = read_metrics(run_dir)
    starts = [r for r in records if r["kind"] == "start"]
    assert [s["step"] for s in starts] == [0, 6]
    corpus = starts[0]["corpus"]
    assert corpus["tokenizer"] == str(bpe_file) and corpus["byte_level"] is False
    assert starts[1]["corpus"] == corpus  # the resumed run read the same (cached) streams
    tokens_per_byte = corpus["validation_tokens"] / corpus["validation_bytes"]
    for record in (r for r in records if r["kind"] == "eval"):
        assert math.isclose(record["bits_per_byte"], record["val_loss"] * tokens_per_byte / math.log(2))
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 10
    capsys.readouterr()
    assert sample.main(["--run", str(run_dir), "--prompt", "def ", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ")
    # Exactly what the tokenizer decodes the model's 12 greedy ids to.
    model, variables, _ = sample.load_model(run_dir)
    tokenizer = TextTokenizer(run_dir / tokenizer_lib.RUN_DIR_FILE)
    prompt = tokenizer.encode("def ")[:-1].tolist()
    ids = sample.generate(model, variables, prompt, max_new_tokens=12, pad=tokenizer.pad)
    assert out == "def " + tokenizer.decode(ids) + "\n"


def test_the_run_directory_keeps_the_tokenizer_it_started_with(bpe_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stored = tokenizer_lib.store(bpe_file, run_dir)
    assert stored == run_dir / "tokenizer.json" and stored.read_bytes() == bpe_file.read_bytes()
    assert tokenizer_lib.store(bpe_file, run_dir) == stored  # a resume with the same file
    other = tmp_path / "other.json"
    other.write_text(bpe_file.read_text().replace('"vocab"', '"vocab" ', 1))
    with pytest.raises(TokenizerError, match=f"differs from tokenizer='{other}': the run used another tokenizer"):
        tokenizer_lib.store(other, run_dir)
