import subprocess
import sys

import pytest

from charrnn import UnknownCharactersError, Vocabulary


@pytest.mark.e2e
def test_sorted_and_deterministic_across_processes():
    text = "the quick brown fox, jumps! Über ✓"
    vocab = Vocabulary.from_text(text)
    assert vocab.chars == "".join(sorted(set(text)))
    code = f"from charrnn import Vocabulary; print(Vocabulary.from_text({text!r}).chars)"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2, 3)
    }
    assert outs == {vocab.chars + "\n"}


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
