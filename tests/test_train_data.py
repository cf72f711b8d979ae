"""Corpora: every input kind, the deterministic disjoint split, clear errors, the resumable sampler."""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest

from train import data
from train.data import BOS, EOS, CorpusError, load_corpus


def write_text_tree(root: pathlib.Path, rng: np.random.Generator, count: int = 60) -> dict[str, bytes]:
    """`count` files of distinct random text (.txt/.md/.py, some nested); returns {relative path: bytes}."""
    files = {}
    for i in range(count):
        suffix = (".txt", ".md", ".py")[i % 3]
        name = f"sub{i % 4}/doc{i}{suffix}" if i % 2 else f"doc{i}{suffix}"
        text = f"document {i}: " + "".join(rng.choice(list("abcdefgh \n"), size=rng.integers(20, 80)))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files[name] = text.encode()
    return files


def documents(stream: np.ndarray) -> list[bytes]:
    """Split a stream back into the documents' bytes at BOS/EOS."""
    ends = np.flatnonzero(stream == EOS)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert np.all(stream[starts] == BOS)
    return [bytes(stream[s + 1 : e].astype(np.uint8)) for s, e in zip(starts, ends, strict=True)]


def test_split_is_deterministic_disjoint_and_complete(tmp_path, seed):
    files = write_text_tree(tmp_path, np.random.default_rng(seed))
    first = load_corpus(str(tmp_path), val_fraction=0.25, vocab_size=259)
    again = load_corpus(str(tmp_path), val_fraction=0.25, vocab_size=259)
    np.testing.assert_array_equal(first.train, again.train)
    np.testing.assert_array_equal(first.validation, again.validation)
    train_docs, val_docs = documents(first.train), documents(first.validation)
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(files.values())
    # Each document sits where the hash of its path says, whatever the directory listing order.
    expected_val = {text for name, text in files.items() if data.in_validation(name, 0.25)}
    assert set(val_docs) == expected_val
    assert first.documents == (len(train_docs), len(val_docs))
    assert first.byte_level


def test_default_corpus_is_the_standard_library():
    corpus = load_corpus(None, val_fraction=0.05, vocab_size=259)
    assert corpus.source.startswith("stdlib:")
    files = data.stdlib_files()
    assert any(p.name == "os.py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    train_docs, val_docs = corpus.documents
    assert train_docs + val_docs == len(files)
    assert 0.01 < val_docs / len(files) < 0.15  # ~5% by hash
    assert len(corpus.train) > 5_000_000  # megabytes of real text
    assert corpus.train.dtype == np.uint16 and int(corpus.train.max()) <= EOS


def test_single_text_file_is_split_by_position(tmp_path):
    text = "x = 1\n" * 500
    (tmp_path / "one.py").write_text(text)
    corpus = load_corpus(str(tmp_path / "one.py"), val_fraction=0.1, vocab_size=259)
    stream = np.concatenate([corpus.train, corpus.validation])
    np.testing.assert_array_equal(stream, data.encode(text))
    assert len(corpus.validation) == round(len(stream) * 0.1)
    assert data.decode(stream) == text


def test_jsonl_records_are_documents(tmp_path, seed):
    rng = np.random.default_rng(seed)
    texts = [f"record {i} " + "é" * int(rng.integers(1, 9)) for i in range(40)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")
    corpus = load_corpus(str(tmp_path / "c.jsonl"), val_fraction=0.3, vocab_size=259)
    got = documents(corpus.train) + documents(corpus.validation)
    assert sorted(d.decode() for d in got) == sorted(texts)
    assert 0 < corpus.documents[1] < 40


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_pretokenised_arrays_load_memory_mapped(tmp_path, seed, dtype):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 1000, size=5000).astype(dtype)
    np.save(tmp_path / "t.npy", tokens)
    tokens.tofile(tmp_path / "t.bin")
    from_npy = load_corpus(str(tmp_path / "t.npy"), val_fraction=0.1, vocab_size=1000)
    from_bin = load_corpus(str(tmp_path / "t.bin"), val_fraction=0.1, vocab_size=1000, token_dtype=dtype)
    for corpus in (from_npy, from_bin):
        assert isinstance(corpus.train.base, np.memmap) or isinstance(corpus.train, np.memmap)
        assert corpus.train.dtype == np.dtype(dtype)
        assert not corpus.byte_level
        np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.validation]), tokens)


def test_directory_of_token_arrays(tmp_path, seed):
    rng = np.random.default_rng(seed)
    shards = {f"shard{i}.npy": rng.integers(0, 300, size=100 + i).astype(np.uint16) for i in range(30)}
    for name, tokens in shards.items():
        np.save(tmp_path / name, tokens)
    corpus = load_corpus(str(tmp_path), val_fraction=0.3, vocab_size=300)
    val = [t for name, t in sorted(shards.items()) if data.in_validation(name, 0.3)]
    np.testing.assert_array_equal(corpus.validation, np.concatenate(val))
    assert len(corpus.train) + len(corpus.validation) == sum(len(t) for t in shards.values())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: _write(d / "empty.txt", b""), "empty"),
        (lambda d: _write(d / "empty.npy", None, np.zeros(0, np.uint16)), "empty"),
        (lambda d: _mkdir(d / "nothing"), "holds no"),
        (lambda d: _write(_mkdir(d / "other") / "a.csv", b"1,2").parent, "holds no"),
        (lambda d: _write(d / "blank.jsonl", b"\n\n"), "no documents"),
        (lambda d: _write(d / "bad.jsonl", b'{"text": "ok"}\n{"body": "x"}\n'), "bad.jsonl:2"),
        (lambda d: _write(d / "num.jsonl", b'{"text": 3}\n'), "must be a string"),
        (lambda d: _write(d / "wide.npy", None, np.zeros(10, np.int64)), "dtype int64"),
        (lambda d: _write(d / "flat.npy", None, np.zeros((2, 5), np.uint16)), "1-D"),
        (lambda d: _write(d / "big.npy", None, np.full(10, 700, np.uint16)), "not < vocab_size=259"),
        (lambda d: _mixed(d), "mixes text files"),
    ],
    ids=[
        "missing",
        "empty-text",
        "empty-array",
        "empty-dir",
        "no-supported-files",
        "blank-jsonl",
        "jsonl-no-text",
        "jsonl-not-string",
        "int64-array",
        "2d-array",
        "id-beyond-vocab",
        "mixed-dir",
    ],
)
def test_bad_corpora_raise_clear_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CorpusError, match=message):
        load_corpus(str(path), val_fraction=0.1, vocab_size=259)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    write_text_tree(tmp_path, np.random.default_rng(0), count=6)
    target = tmp_path / "doc0.txt"
    original = pathlib.Path.read_bytes

    def read_bytes(self):
        if self == target:
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    with pytest.raises(CorpusError, match=r"cannot read data file .*doc0\.txt.*Permission denied"):
        load_corpus(str(tmp_path), val_fraction=0.1, vocab_size=259)


def test_a_split_too_small_for_one_window_is_an_error(tmp_path):
    (tmp_path / "short.txt").write_text("print(1)\n" * 20)
    corpus = load_corpus(str(tmp_path / "short.txt"), val_fraction=0.1, vocab_size=259)
    with pytest.raises(CorpusError, match="validation split has 18 tokens, fewer than one window"):
        data.check_fits(corpus, window=65)


def test_sampler_resumes_exactly(seed):
    stream = np.arange(10_000, dtype=np.uint16)
    straight = data.BatchSampler(stream, window=17, batch_size=4, seed=seed)
    batches = [straight.next() for _ in range(6)]
    first = data.BatchSampler(stream, window=17, batch_size=4, seed=seed)
    for _ in range(3):
        first.next()
    saved = json.loads(json.dumps(first.state()))  # what the checkpoint stores
    resumed = data.BatchSampler(stream, window=17, batch_size=4, seed=seed + 1)
    resumed.restore(saved)
    for expected in batches[3:]:
        np.testing.assert_array_equal(resumed.next(), expected)
    for batch in batches:
        assert batch.shape == (4, 17) and batch.dtype == np.int32
        np.testing.assert_array_equal(np.diff(batch, axis=1), 1)  # contiguous windows of the stream
    assert len({b.tobytes() for b in batches}) == len(batches)


def test_evaluation_batches_are_fixed_and_cover_the_stream():
    stream = np.arange(1000, dtype=np.uint16)
    batches = data.evaluation_batches(stream, window=11, batch_size=3, num_batches=4)
    again = data.evaluation_batches(stream, window=11, batch_size=3, num_batches=4)
    assert len(batches) == 4 and batches[0].shape == (3, 11)
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a, b)
    starts = np.concatenate([b[:, 0] for b in batches])
    assert starts[0] == 0 and starts[-1] == 1000 - 11


def test_encode_decode_round_trip():
    text = "déf f(x):\n    return x  # ünïcode ✓\n"
    tokens = data.encode(text)
    assert tokens[0] == BOS and tokens[-1] == EOS and tokens.dtype == np.uint16
    assert data.decode(tokens) == text


def _write(path: pathlib.Path, content: bytes | None, array: np.ndarray | None = None) -> pathlib.Path:
    if array is not None:
        np.save(path, array)
    else:
        path.write_bytes(content)
    return path


def _mkdir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir()
    return path


def _mixed(root: pathlib.Path) -> pathlib.Path:
    _write(root / "a.txt", b"text")
    _write(root / "b.npy", None, np.zeros(4, np.uint16))
    return root


@pytest.mark.parametrize(("val_fraction", "held_out"), [(0.05, "doc3.txt"), (0.95, "doc2.txt")])
def test_a_small_corpus_gets_both_splits(tmp_path, val_fraction, held_out):
    # Three names that hash all into train at 5% and all into validation at 95%: the lowest hash ("doc3.txt")
    # moves to validation, or the highest ("doc2.txt") to train; which one depends on the names alone.
    names = ["doc0.txt", "doc2.txt", "doc3.txt"]
    hashes = {name: int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64 for name in names}
    assert all(0.05 <= h < 0.95 for h in hashes.values()), hashes  # the premise: one split takes all
    assert min(hashes, key=hashes.get) == "doc3.txt" and max(hashes, key=hashes.get) == "doc2.txt"
    for name in names:
        _write(tmp_path / name, name.encode() * 40)
    corpus = load_corpus(str(tmp_path), val_fraction=val_fraction, vocab_size=259)
    odd_one = held_out.encode() * 40
    lonely = corpus.validation if val_fraction < 0.5 else corpus.train
    assert corpus.documents == ((2, 1) if val_fraction < 0.5 else (1, 2))
    assert bytes(lonely[1:-1].astype(np.uint8)) == odd_one  # [BOS, bytes, EOS]
