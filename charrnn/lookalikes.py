"""Text a user pastes, fitted to a model's vocabulary: each character the vocabulary lacks is
replaced by one it has (by Unicode normalisation, then a short table of typographic
look-alikes) or dropped, with a report of what happened where.

Curly quotes, dashes, accents, non-breaking spaces and ellipses are what people paste; a model
trained on one typography (Alice's curly quotes, say) then refuses the other. The replacements
are tried in order, and the first one the vocabulary can spell wins:

1. NFKC (compatibility forms: the ligature "ﬁ" is "fi", a full-width "Ａ" is "A");
2. NFKD without its combining marks ("é" is "e", "Å" is "A");
3. ``LOOKALIKES``: typographic characters and their plain ones, both ways, so that a
   vocabulary with only curly quotes takes a straight one and one with only straight quotes
   takes a curly one.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from typing import Literal

from charrnn.vocab import Vocabulary

Mode = Literal["error", "replace", "drop"]
MODES: tuple[Mode, ...] = ("error", "replace", "drop")

_SINGLE = "'\u2019\u2018\u201a\u201b\u2032"
_DOUBLE = '"\u201c\u201d\u201e\u201f\u2033\u00ab\u00bb'
_DASH = "-\u2010\u2011\u2012\u2013\u2014\u2015\u2212"
_SPACE = " \u00a0\u2002\u2003\u2007\u2009\u200a\u202f\u3000\t"

# Each character -> the characters that may stand for it, best first.
LOOKALIKES: dict[str, str] = {}
for _group in (_SINGLE, _DOUBLE, _DASH, _SPACE):
    for _ch in _group:
        LOOKALIKES[_ch] = "".join(c for c in _group if c != _ch)
LOOKALIKES |= {
    "\u2026": "...",  # an ellipsis: three dots (tried as one text)
    "\u00b7": ".",
    "\u2022": "*-",
    "\u2039": "'\u2019",
    "\u203a": "'\u2019",
    "\r": "\n",
}


@dataclass
class Fitted:
    """``text`` in the vocabulary; ``replaced``: (character, replacement, position),
    ``dropped``: (character, position), positions in the original text."""

    text: str
    replaced: list[tuple[str, str, int]] = field(default_factory=list)
    dropped: list[tuple[str, int]] = field(default_factory=list)


def fit(text: str, vocab: Vocabulary, mode: Mode) -> Fitted:
    """``text`` with each character outside ``vocab`` replaced (``mode`` "replace") or
    dropped ("drop"); "error" changes nothing (the caller refuses unknown characters)."""
    if mode == "error" or not vocab.unknown(text):
        return Fitted(text)
    out: list[str] = []
    fitted = Fitted("")
    for pos, ch in enumerate(text):
        if ch in vocab:
            out.append(ch)
            continue
        by = replacement(ch, vocab, text[pos - 1] if pos else " ") if mode == "replace" else None
        if by:
            out.append(by)
            fitted.replaced.append((ch, by, pos))
        else:
            fitted.dropped.append((ch, pos))
    fitted.text = "".join(out)
    return fitted


# A straight quote opens after a space or a bracket, and closes (or is an apostrophe) else.
_OPENS_AFTER = set(_SPACE) | set("([{\n-\u2014\u2013")
_CURLY = {"'": ("\u2018", "\u2019"), '"': ("\u201c", "\u201d")}


def replacement(ch: str, vocab: Vocabulary, before: str = " ") -> str | None:
    """What ``vocab`` can write for ``ch`` (``before``: the character before it), or None."""
    if ch in _CURLY:
        opening, closing = _CURLY[ch]
        best = opening if before in _OPENS_AFTER else closing
        if best in vocab:
            return best
    candidates = [
        unicodedata.normalize("NFKC", ch),
        "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)),
    ]
    alike = LOOKALIKES.get(ch, "")
    candidates += [alike] if alike == "..." else list(alike)
    for candidate in candidates:
        if candidate and candidate != ch and all(c in vocab for c in candidate):
            return candidate
    return None
