"""The training text's index (charrnn/textindex.py) against brute force on random texts:
the suffix array, occurs, find's counts, extend, next_chars, the longest-occurring-suffix walk
(advance, with and without a cap) and is_line; files round-trip and load without pickle."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from charrnn import Vocabulary
from charrnn.textindex import TextIndex, TextIndexError, suffix_array


def _texts():
    """Random texts over small alphabets (many repeats, so long matches), of many lengths,
    with a vocabulary holding a character or two the text lacks."""
    for seed in range(25):
        rng = random.Random(seed)
        alphabet = "ab\nc "[: rng.randint(1, 5)]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
        yield rng, alphabet, text, Vocabulary.from_text(text + alphabet + "xé")


def test_suffix_array_is_the_sorted_suffixes():
    for _, _, text, vocab in _texts():
        sa = suffix_array(np.array(vocab.encode(text), dtype=np.uint8))
        assert sa.dtype == np.int32
        assert sa.tolist() == sorted(range(len(text)), key=lambda i: text[i:])
    assert suffix_array(np.zeros(0, dtype=np.uint8)).tolist() == []


def test_queries_match_brute_force():
    for rng, alphabet, text, vocab in _texts():
        index = TextIndex.build(text, vocab)
        for _ in range(150):
            run = "".join(rng.choice(alphabet + "x") for _ in range(rng.randint(0, 9)))
            ids = vocab.encode(run)
            assert index.occurs(ids) == (run in text), run
            m = index.find(ids)
            starts = [i for i in range(len(text)) if text.startswith(run, i)]
            if m is None:
                assert not starts
                continue
            assert m.count == len(starts) and m.length == len(run)
            assert sorted(index.sa[m.lo : m.hi].tolist()) == starts
            following = sorted({text[i + len(run)] for i in starts if i + len(run) < len(text)})
            assert index.next_chars(m).tolist() == sorted(vocab.encode("".join(following)))
            for ch in vocab.chars:
                grown = index.extend(m, vocab.encode(ch)[0])
                assert (grown is not None) == (run + ch in text), (run, ch)
                if grown is not None:
                    assert grown == index.find(vocab.encode(run + ch))
            if run:
                assert index.shorten(m) == index.find(ids[1:])


@pytest.mark.parametrize("cap", [None, 1, 4])
def test_advance_follows_the_longest_suffix_that_occurs(cap):
    for rng, alphabet, text, vocab in _texts():
        index = TextIndex.build(text, vocab)
        written = "".join(rng.choice(alphabet + "x") for _ in range(120))
        m = index.root()
        for end in range(1, len(written) + 1):
            m = index.advance(m, vocab.encode(written[end - 1])[0], cap)
            longest = max(
                n for n in range(min(end, cap or end) + 1) if written[end - n : end] in text
            )
            assert m.length == longest, (written[:end], cap)
            assert index.find(vocab.encode(written[end - m.length : end])) == m


def test_is_line_against_the_texts_lines():
    text = "first line\nsecond, line\n\nfirst line\nlast without newline"
    index = TextIndex.build(text, Vocabulary.from_text(text + "?"))
    for line in ("first line", "second, line", "last without newline", "first line\n"):
        assert index.is_line(line), line
    for line in ("", "\n", "first", "first line\nsecond, line", "line", "last without newline?"):
        assert not index.is_line(line), line
    for _, alphabet, text, vocab in _texts():
        index = TextIndex.build(text, vocab)
        lines = {line for line in text.split("\n") if line}
        assert len(index.line_keys) == len(lines)
        for line in lines:
            assert index.is_line(line)
        rng = random.Random(len(text))
        for _ in range(50):
            probe = "".join(rng.choice(alphabet.replace("\n", "") + "x") for _ in range(3))
            assert index.is_line(probe) == (probe in lines)


def test_a_large_vocabulary_takes_two_bytes_a_character():
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(300)]
    text = "".join(rng.choice(chars[:12]) for _ in range(2000))
    vocab = Vocabulary.from_text("".join(chars))
    index = TextIndex.build(text, vocab)
    assert index.ids.dtype == np.uint16
    for _ in range(200):
        start = rng.randrange(len(text))
        run = text[start : start + rng.randint(1, 6)]
        assert index.occurs(vocab.encode(run))
        assert index.occurs(vocab.encode(run + chars[299])) is False
        m = index.find(vocab.encode(run))
        assert m is not None and m.count == sum(text.startswith(run, i) for i in range(len(text)))


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_files_round_trip_and_load_without_pickle(tmp_path):
    text = "the cat sat\non the mat\n" * 20
    vocab = Vocabulary.from_text(text).grow("é")
    index = TextIndex.build(text, vocab, "ab" * 32)
    path = tmp_path / "t.index.npz"
    index.save(path)
    back = TextIndex.load(path)
    assert back.vocab == vocab and back.corpus_sha256 == "ab" * 32
    assert np.array_equal(back.sa, index.sa) and np.array_equal(back.ids, index.ids)
    assert back.occurs(vocab.encode("mat\nthe")) and back.is_line("on the mat")
    with pytest.raises(TextIndexError, match="file not found"):
        TextIndex.load(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(TextIndexError, match="not a text index"):
        TextIndex.load(tmp_path / "junk.npz")
    # An array of Python objects would need pickle: refused, not unpickled.
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "evil.npz", format=np.array([_Payload(str(marker))], dtype=object))
    with pytest.raises(TextIndexError):
        TextIndex.load(tmp_path / "evil.npz")
    assert not marker.exists()
    np.savez(tmp_path / "other.npz", sa=np.zeros(3, dtype=np.int32))
    with pytest.raises(TextIndexError, match="not a CharRNN text index"):
        TextIndex.load(tmp_path / "other.npz")


def test_a_version_1_file_loads_and_its_line_hashes_go_unread(tmp_path):
    """Version 1 also stored blake2b hashes of the lines; the keys derived from the ids
    replace them, so such a file (the shipped index was one) answers the same."""
    text = "the cat sat\non the mat\n" * 20
    vocab = Vocabulary.from_text(text)
    index = TextIndex.build(text, vocab)
    path = tmp_path / "v1.index.npz"
    np.savez_compressed(
        path,
        format=np.array("charrnn-textindex"),
        format_version=np.array(1),
        vocab=np.array(vocab.chars),
        corpus_sha256=np.array(index.corpus_sha256),
        ids=index.ids,
        sa=index.sa,
        lines=np.array([1, 2], dtype=np.uint64),
    )
    back = TextIndex.load(path)
    assert np.array_equal(back.line_keys, index.line_keys)
    assert back.is_line("on the mat") and not back.is_line("the cat")
    np.savez_compressed(path, format=np.array("charrnn-textindex"), format_version=np.array(3))
    with pytest.raises(TextIndexError, match="unsupported format version 3"):
        TextIndex.load(path)
