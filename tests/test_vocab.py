"""The vocabulary: its order (which fixes every id a checkpoint stores), encoding, and what it
refuses."""

import pytest

from charrnn import UnknownCharactersError, Vocabulary
from training.data import load_corpus

# The order written out, code point by code point: not a set's (which follows the hash seed,
# PYTHONHASHSEED), nor first appearance, nor UTF-16 code units' (the emoji would come before
# U+FF01), nor a locale's (case-folded, accents beside their letters); "\u00e9" and "e" with a
# combining U+0301 stay distinct.
TEXT = (
    "the quick brown fox, jumps! \u00dcber \u2713 cafe\u0301 \u00e9t\u00e9 \uff01 \U0001f600 "
    "Zebra\n"
)
CHARS = "\n !,Zabcefhijkmnopqrstuwx\u00dc\u00e9\u0301\u2713\uff01\U0001f600"


def test_the_order_is_code_point_order_whatever_the_hash_seed(tmp_path):
    """The order a vocabulary is built in is the ids a checkpoint's weights are indexed by:
    built by another process (a resumed run, another rank, the service), with another hash
    seed, it must come out the same. Both ways one is built: from a text, and by training
    (counts over a file, then its id cache)."""
    vocab = Vocabulary.from_text(TEXT)
    assert vocab.chars == CHARS
    assert vocab.encode("\n\U0001f600") == [0, len(CHARS) - 1]
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    built = load_corpus(path, cache_dir=tmp_path / "ids")
    cached = load_corpus(path, cache_dir=tmp_path / "ids")
    assert built.vocab.chars == cached.vocab.chars == CHARS


def test_encode_decode_round_trip():
    vocab = Vocabulary.from_text("hello world")
    ids = vocab.encode("low reed")
    assert ids == [vocab.chars.index(c) for c in "low reed"]
    assert vocab.decode(ids) == "low reed"


def test_unknown_characters_listed_with_first_positions():
    vocab = Vocabulary.from_text("abc ")
    assert vocab.unknown("abxc yx") == [("x", 2), ("y", 5)]
    assert vocab.unknown("cab") == []
    with pytest.raises(UnknownCharactersError) as e:
        vocab.encode("ab\x00z")
    assert e.value.unknown == [("\x00", 2), ("z", 3)]
    assert "'\\x00' at position 2" in str(e.value)


def test_rejects_duplicate_or_no_chars():
    with pytest.raises(ValueError):
        Vocabulary("aab")
    with pytest.raises(ValueError):
        Vocabulary("")


def test_grow_appends_new_characters_and_keeps_old_ids():
    old = Vocabulary.from_text("hello world")
    grown = old.grow("wörld, hello! 42")
    assert grown.chars == old.chars + "!,24ö"  # the new ones sorted among themselves, at the end
    assert grown.encode("hello world") == old.encode("hello world")
    assert grown.decode(grown.encode("wörld, 42")) == "wörld, 42"
    assert old.grow("low") is old
    # A grown vocabulary is not sorted, and still a vocabulary (it round-trips through a
    # checkpoint's string); grown again, it keeps its order too.
    assert Vocabulary(grown.chars) == grown
    assert grown.grow("zé").chars == grown.chars + "zé"
