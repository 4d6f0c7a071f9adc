"""The encoded-corpus cache: vectorised encoding, reuse, rebuild, atomicity, id widths, views."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from charrnn import Vocabulary
from tests.conftest import make_text, tiny_fit_args
from training import data
from training.__main__ import main
from training.data import Batches, encode, load_corpus, tail_ids
from training.errors import TrainingError


def _cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_encoding_matches_the_vocabulary_and_reads_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 1000)  # many chunks, split multi-byte characters
    text = make_text(20_000).replace("e", "é").replace("a", "\u2603") + "\U0001f600!"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(path, tmp_path / "cache")
    vocab = Vocabulary.from_text(text)
    assert corpus.vocab == vocab
    assert np.array_equal(corpus.ids, vocab.encode(text))
    assert isinstance(corpus.ids, np.memmap) and corpus.ids.dtype == np.uint8
    assert np.array_equal(tail_ids(path, vocab, 0.1), vocab.encode(text[-int(len(text) * 0.1) :]))


def test_non_utf8_is_refused_with_the_byte_offset_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 64)
    path = tmp_path / "bad.txt"
    path.write_bytes(b"x" * 100 + "é".encode() + b"y" * 30 + b"\xff" + b"z" * 50)
    with pytest.raises(TrainingError, match=r"not valid UTF-8: .* \(byte 132: b'\\xff'\)"):
        load_corpus(path, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not _cache_files(tmp_path / "cache")


@pytest.mark.parametrize(("distinct", "dtype"), [(200, np.uint8), (300, np.uint16)])
def test_ids_take_the_narrowest_type(tmp_path, distinct, dtype):
    chars = "".join(chr(0x100 + i) for i in range(distinct))
    path = tmp_path / "t.txt"
    path.write_text(chars * 3, encoding="utf-8")
    corpus = load_corpus(path, tmp_path / "cache")
    assert corpus.ids.dtype == dtype and len(corpus.vocab) == distinct
    assert corpus.vocab.decode(corpus.ids[:distinct].tolist()) == chars


def test_int32_ids_beyond_65536_characters():
    chars = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000)
    assert data.id_dtype(len(chars)) == np.int32
    ids = encode(Vocabulary.from_text(chars), chars)
    assert ids.dtype == np.int32 and ids[-1] == len(chars) - 1


def test_cache_is_reused_and_rebuilt_when_the_corpus_changes(tmp_path, monkeypatch):
    path, cache = tmp_path / "t.txt", tmp_path / "cache"
    path.write_text(make_text(5000), encoding="utf-8")
    first = load_corpus(path, cache)
    files = _cache_files(cache)
    assert files == [f"{first.sha256}.ids.npy", f"{first.sha256}.vocab.json"]
    built = []
    monkeypatch.setattr(data, "_build", lambda *a: built.append(a) or pytest.fail("rebuilt"))
    again = load_corpus(path, cache)
    assert not built and again.sha256 == first.sha256 and np.array_equal(again.ids, first.ids)
    monkeypatch.undo()
    path.write_text(make_text(5000, seed=1) + "Z", encoding="utf-8")
    changed = load_corpus(path, cache)
    assert changed.sha256 != first.sha256 and "Z" in changed.vocab
    assert len(_cache_files(cache)) == 4
    # A cache file that does not match its description is rebuilt, not trusted.
    want = np.array(changed.ids)
    (cache / f"{changed.sha256}.ids.npy").unlink()  # a new inode: the old map stays valid
    (cache / f"{changed.sha256}.ids.npy").write_bytes(b"garbage")
    assert np.array_equal(load_corpus(path, cache).ids, want)


@pytest.mark.e2e
@pytest.mark.slow
def test_no_half_written_cache_file_after_a_kill(tmp_path):
    """kill -9 in the middle of encoding leaves no cache entry, and the next start cleans up
    the dead build's temp file and encodes afresh."""
    path, cache = tmp_path / "big.txt", tmp_path / "cache"
    unit = make_text(1 << 20)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(80):  # 80 MB: encoding takes long enough to be caught half-way
            f.write(unit)
    code = (
        "from pathlib import Path; from training.data import load_corpus; "
        f"load_corpus(Path({str(path)!r}), Path({str(cache)!r}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not (cache.exists() and any(p.suffix == ".tmp" for p in cache.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "no build in progress seen"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = _cache_files(cache)
    assert not any(n.endswith((".ids.npy", ".vocab.json")) for n in names), names
    corpus = load_corpus(path, cache)
    assert len(corpus) == 80 * len(unit)
    assert not any(n.endswith(".tmp") for n in _cache_files(cache))


def test_batches_copy_only_their_window(corpus_text):
    ids = encode(Vocabulary.from_text(corpus_text), corpus_text)
    b = Batches(ids, 8, 25)
    w = b.window(2)
    assert w.shape == (8, 26) and w.dtype == np.int64
    row_len = b.n_batches * 25
    assert np.array_equal(w[5], ids[5 * row_len + 50 : 5 * row_len + 76])
    x, y = b[2]
    assert x.shape == y.shape == (8, 25)
    assert np.array_equal(x.numpy(), w[:, :-1]) and np.array_equal(y.numpy(), w[:, 1:])


@pytest.mark.e2e
def test_out_creates_its_folder(corpus_file, tmp_path, capsys):
    out = tmp_path / "new" / "runs" / "m.pt"
    assert main(tiny_fit_args(corpus_file, out, 1)) == 0
    assert out.is_file() and os.path.getsize(out) > 0
