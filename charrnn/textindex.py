"""The training text's index: does a run of characters occur in the text a model was trained
on, which characters would extend such a run, and is a line one of its lines.

It holds the text's ids (under the model's vocabulary) and their suffix array (int32), with
the text's sha256, and derives the keys of the text's lines from the ids when it is built or
loaded (``line_keys``: one vectorised pass). The service can
follow the longest suffix of what it has generated that occurs in the text (``advance``, one
character at a time) and, once that run is ``max_copy_chars`` long, mask the characters that
would make it longer (``next_chars``): then no generated run longer than that occurs in the
training text.

A run is followed as a ``Match``: the interval of the suffix array whose suffixes all start
with the run. Queries compare the text as bytes, each id stored as id + 1 in big-endian order
(so byte order is id order, and the end of the text, a shorter string, sorts first) and binary
search the suffix array with ``bisect``: ``extend`` and ``find`` take O(log n) comparisons.

Saved as an ``.npz`` of plain arrays (loaded with ``allow_pickle=False``: no code runs).
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from charrnn.vocab import UnknownCharactersError, Vocabulary

FORMAT = "charrnn-textindex"
# Version 1 also stored blake2b hashes of the lines, which the keys derived from the ids
# replace: such a file loads, its hashes unread.
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
# Intervals this small are read whole (a vectorised gather) instead of binary searched.
SMALL = 64
# A line's key for the copy guard: the polynomial hash sum((id + 1) * P**(m - 1 - i)) modulo
# 2**64 of its m ids, which a generated line updates one character at a time (h * P + id + 1),
# here and in charrnn/csrc/decode.cpp. A collision can only forbid a line that is new.
LINE_P = 0x100000001B3
_MASK64 = (1 << 64) - 1


class TextIndexError(Exception):
    """An index file that cannot be used; the message names the path and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class Match:
    """Suffix-array rows ``[lo, hi)``: the text's suffixes that start with the run being
    followed, which is ``length`` characters long (``length`` 0: every suffix)."""

    lo: int
    hi: int
    length: int

    @property
    def count(self) -> int:
        """How many times the run occurs in the text."""
        return self.hi - self.lo


def suffix_array(ids: np.ndarray) -> np.ndarray:
    """The suffix array of ``ids`` (int32): prefix doubling, each round one numpy sort of
    (rank, rank k further on) pairs, until every suffix has its own rank. Rounds: about
    log2 of the longest repeated run."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.int32)
    if n >= 1 << 31:
        raise ValueError("a text index holds at most 2**31 - 1 characters")
    rank = ids.astype(np.int64) + 1  # 0 is "past the end", smaller than any character
    k = 1
    while True:
        second = np.zeros(n, dtype=np.int64)
        second[: n - k] = rank[k:]
        key = rank * (int(rank.max()) + 1) + second
        sa = np.argsort(key, kind="stable")
        ordered = key[sa]
        rank = np.empty(n, dtype=np.int64)
        rank[sa] = np.cumsum(np.concatenate(([1], ordered[1:] != ordered[:-1])))
        if rank[sa[-1]] == n:  # at the latest once 2k >= n
            return sa.astype(np.int32)
        k *= 2


def next_line_key(key: int, char: int) -> int:
    """The key of a line with the key ``key`` followed by the character ``char``."""
    return (key * LINE_P + char + 1) & _MASK64


def line_key(ids: Sequence[int]) -> int:
    """The key (``LINE_P``) of the line ``ids`` (without its newline)."""
    h = 0
    for i in ids:
        h = next_line_key(h, int(i))
    return h


def line_keys(ids: np.ndarray, newline: int) -> np.ndarray:
    """The sorted distinct keys of the non-empty lines of ``ids`` (uint64), all at once: with
    S[j] = sum over i < j of (id_i + 1) * P**-i, the line [a, b) has the key
    P**(b - 1) * (S[b] - S[a]), modulo 2**64 (P is odd, so it has an inverse)."""
    n = len(ids)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        powers = np.multiply.accumulate(np.full(n, LINE_P, dtype=np.uint64))
        powers = np.concatenate(([np.uint64(1)], powers[:-1]))
        inverse = np.multiply.accumulate(np.full(n, pow(LINE_P, -1, 1 << 64), dtype=np.uint64))
        inverse = np.concatenate(([np.uint64(1)], inverse[:-1]))
        s = np.concatenate(([np.uint64(0)], np.cumsum((ids.astype(np.uint64) + 1) * inverse)))
        breaks = np.flatnonzero(ids == newline) if newline >= 0 else np.zeros(0, dtype=np.int64)
        starts = np.concatenate(([0], breaks + 1))
        ends = np.concatenate((breaks, [n]))
        full = ends > starts
        starts, ends = starts[full], ends[full]
        keys = powers[ends - 1] * (s[ends] - s[starts])
    return np.unique(keys)


def _id_dtype(vocab_size: int) -> type[np.integer]:
    """The narrowest array type that holds every id (as training's id cache stores them)."""
    return np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.int32


def _width(vocab_size: int) -> int:
    """Bytes per character in the comparison text (id + 1 must fit)."""
    return 1 if vocab_size < 0xFF else 2 if vocab_size < 0xFFFF else 4


class TextIndex:
    """``TextIndex.build(text, vocab)`` or ``TextIndex.load(path)``; queries take ids under
    ``vocab`` (``index.vocab.encode(text)``)."""

    def __init__(
        self,
        ids: np.ndarray,
        sa: np.ndarray,
        vocab: Vocabulary,
        corpus_sha256: str,
    ):
        self.ids, self.sa = ids, sa
        self.vocab, self.corpus_sha256 = vocab, corpus_sha256
        self._w = _width(len(vocab))
        self._text = (ids.astype(np.uint32) + 1).astype(f">u{self._w}").tobytes()
        self._sa: Sequence[int] = memoryview(np.ascontiguousarray(sa, dtype=np.int32))
        # The ids as int32, then -1 one past the end (which sorts first): for vectorised
        # gathers here, and the native copy guard's view of the text.
        self.ids_end = np.append(ids.astype(np.int32), np.int32(-1))
        self.newline = vocab.chars.find("\n")  # -1: the text is one line
        # The lines' keys for the copy guard (LINE_P), sorted as unsigned.
        self.line_keys = line_keys(ids, self.newline)

    # -- building and files --------------------------------------------------------------------

    @classmethod
    def build(cls, text: str, vocab: Vocabulary, corpus_sha256: str | None = None) -> TextIndex:
        """The index of ``text`` (every character must be in ``vocab``)."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(max(map(ord, vocab.chars)), int(cps.max(initial=0))) + 1, -1)
        table[[ord(c) for c in vocab.chars]] = np.arange(len(vocab))
        ids = table[cps]
        if (ids < 0).any():
            vocab.encode(text)  # raises UnknownCharactersError naming them
        ids = ids.astype(_id_dtype(len(vocab)))
        sha = corpus_sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()
        return cls(ids, suffix_array(ids), vocab, sha)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index as an ``.npz`` atomically (temp file and rename)."""
        from charrnn.checkpoint import atomic_write

        arrays = {
            "format": np.array(FORMAT),
            "format_version": np.array(FORMAT_VERSION),
            "vocab": np.array(self.vocab.chars),
            "corpus_sha256": np.array(self.corpus_sha256),
            "ids": self.ids,
            "sa": self.sa,
        }
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TextIndex:
        """Read an index written by ``save``; any problem raises ``TextIndexError``."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise TextIndexError(path, "file not found") from None
        except OSError as e:
            raise TextIndexError(path, f"cannot read the file: {e.strerror or e}") from None
        except (ValueError, zipfile.BadZipFile, EOFError) as e:
            raise TextIndexError(path, f"not a text index ({type(e).__name__})") from None
        if str(arrays.get("format", "")) != FORMAT:
            raise TextIndexError(path, "not a CharRNN text index")
        if int(arrays.get("format_version", -1)) not in READS_VERSIONS:
            raise TextIndexError(path, f"unsupported format version {arrays['format_version']}")
        try:
            vocab = Vocabulary(str(arrays["vocab"]))
            ids, sa = arrays["ids"], arrays["sa"]
            ok = (
                ids.ndim == sa.ndim == 1
                and len(ids) == len(sa)
                and sa.dtype == np.int32
                and (len(ids) == 0 or (int(ids.max()) < len(vocab) and int(ids.min()) >= 0))
                and (len(sa) == 0 or (int(sa.min()) >= 0 and int(sa.max()) < len(sa)))
            )
        except (KeyError, ValueError) as e:
            raise TextIndexError(path, f"incomplete index ({e})") from None
        if not ok:
            raise TextIndexError(path, "corrupt index (arrays do not fit together)")
        return cls(ids, sa, vocab, str(arrays["corpus_sha256"]))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Memory the ids, the suffix array and the line keys take."""
        return self.ids.nbytes + self.sa.nbytes + self.line_keys.nbytes

    # -- runs ------------------------------------------------------------------------------------

    def root(self) -> Match:
        """The empty run: it occurs everywhere."""
        return Match(0, len(self.ids), 0)

    def _bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        a = np.asarray(ids, dtype=np.int64)
        if len(a) and (a.min() < 0 or a.max() >= len(self.vocab)):
            raise ValueError("ids outside the index's vocabulary")
        return (a.astype(np.uint32) + 1).astype(f">u{self._w}").tobytes()

    def find(self, ids: Sequence[int] | np.ndarray) -> Match | None:
        """The run ``ids`` as a Match, or None when it does not occur."""
        pattern = self._bytes(ids)
        if not pattern:
            return self.root()
        text, size = self._text, len(pattern)
        w = self._w

        def key(p: int) -> bytes:
            return text[p * w : p * w + size]

        lo = bisect_left(self._sa, pattern, key=key)
        hi = bisect_right(self._sa, pattern, lo, key=key)
        return Match(lo, hi, len(pattern) // w) if hi > lo else None

    def occurs(self, ids: Sequence[int] | np.ndarray) -> bool:
        """Whether the run ``ids`` occurs in the text (the empty run always does)."""
        return self.find(ids) is not None

    def extend(self, m: Match, char: int) -> Match | None:
        """The run ``m`` followed by ``char``, or None when that does not occur."""
        lo, hi, length = m.lo, m.hi, m.length
        if hi - lo <= SMALL:
            keys = self.ids_end[self.sa[lo:hi] + length]
            a, b = np.searchsorted(keys, [char, char + 1])
            return Match(lo + int(a), lo + int(b), length + 1) if b > a else None
        text, w = self._text, self._w
        c = self._bytes([char])

        def key(p: int) -> bytes:
            at = (p + length) * w
            return text[at : at + w]

        a = bisect_left(self._sa, c, lo, hi, key=key)
        b = bisect_right(self._sa, c, a, hi, key=key)
        return Match(a, b, length + 1) if b > a else None

    def next_chars(self, m: Match) -> np.ndarray:
        """The characters (ids, ascending) that follow the run ``m`` somewhere in the text:
        those ``extend`` would accept."""
        lo, hi, length = m.lo, m.hi, m.length
        if hi - lo <= SMALL * 16:
            found = np.unique(self.ids_end[self.sa[lo:hi] + length])
            return found[found >= 0].astype(np.int64)
        text, w, sa = self._text, self._w, self._sa
        out: list[int] = []

        def key(p: int) -> bytes:
            at = (p + length) * w
            return text[at : at + w]

        i = lo
        while i < hi:  # one binary search per distinct next character
            k = key(sa[i])
            if k:
                out.append(int.from_bytes(k, "big") - 1)
            i = bisect_right(sa, k, i, hi, key=key)
        return np.array(out, dtype=np.int64)

    def shorten(self, m: Match) -> Match:
        """The run ``m`` without its first character (which occurs wherever ``m`` does)."""
        if m.length <= 1:
            return self.root()
        start = int(self.sa[m.lo])
        found = self.find(self.ids[start + 1 : start + m.length])
        assert found is not None
        return found

    def advance(self, m: Match, char: int, max_length: int | None = None) -> Match:
        """After ``char`` is written: the longest suffix of the run ``m`` followed by ``char``
        that occurs in the text, at most ``max_length`` long. With ``m`` the longest
        occurring suffix of the text written so far (``root()`` to start), the result is that
        of the text with ``char``: the suffix automaton's walk, over the suffix array."""
        while True:
            if max_length is not None and m.length >= max_length:
                m = self.shorten(m)
                continue
            grown = self.extend(m, char)
            if grown is not None:
                return grown
            if m.length == 0:
                return m  # the character never occurs
            m = self.shorten(m)

    # -- lines -----------------------------------------------------------------------------------

    def is_line_key(self, key: int) -> bool:
        """Whether a line with the key ``key`` (``line_key``) is a line of the text."""
        at = int(np.searchsorted(self.line_keys, np.uint64(key)))
        return at < len(self.line_keys) and int(self.line_keys[at]) == key

    def is_line(self, line: str) -> bool:
        """Whether ``line`` (a trailing newline ignored) is a whole line of the text. Empty
        lines are not counted."""
        line = line.removesuffix("\n")
        if not line or "\n" in line:
            return False
        try:
            ids = self.vocab.encode(line)
        except UnknownCharactersError:
            return False  # a character the text never has
        return self.is_line_key(line_key(ids))


def index_path(checkpoint: str | os.PathLike[str]) -> Path:
    """Where a checkpoint's text index is kept: ``NAME.index.npz`` beside ``NAME.pt``."""
    p = Path(checkpoint)
    return p.with_name(p.stem + ".index.npz")
