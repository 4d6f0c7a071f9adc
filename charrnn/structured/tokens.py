"""llguidance's view of a character vocabulary: one token per character, "end", and the bytes
that UTF-8 text may hold and no character of the vocabulary is."""

from __future__ import annotations

import functools

import llguidance


class _Characters:
    """llguidance's view of a character vocabulary (what ``TokenizerWrapper`` reads): token
    ``i < V`` is character ``i``'s UTF-8 bytes, ``V`` the end of the match, and after it one
    token for each byte that UTF-8 text may hold and no character of the vocabulary is.

    The model never draws those byte tokens (the sampler reads a mask's first V + 1 bits
    only), but llguidance needs them: it assumes any text can be tokenized, and where a
    grammar forces a character that no token spells it lets the character after it through
    instead. With them, a mask allows only characters that truly continue a match, and
    a match that needs a missing character shows as a mask with no character of the
    vocabulary, which also names it (``_walk``)."""

    def __init__(self, chars: str):
        self.ids = {ch.encode(): i for i, ch in enumerate(chars)}
        singles = (bytes([b]) for b in range(0xF5) if b not in (0xC0, 0xC1))  # UTF-8's bytes
        self.extra = [b for b in singles if b not in self.ids]
        self.ids |= {b: len(chars) + 1 + i for i, b in enumerate(self.extra)}
        # A special token's bytes start with 0xff, which UTF-8 text never holds.
        self.tokens = [ch.encode() for ch in chars] + [b"\xff<end>"] + self.extra
        self.eos_token_id = len(chars)
        self.bos_token_id = None
        self.special_token_ids = [len(chars)]

    def __call__(self, text: bytes) -> list[int]:
        """Exact: llguidance tokenizes the text a grammar forces with it."""
        out: list[int] = []
        for ch in text.decode(errors="surrogateescape"):
            spelled = ch.encode(errors="surrogateescape")
            if spelled in self.ids:
                out.append(self.ids[spelled])
            else:
                out.extend(self.ids[bytes([b])] for b in spelled if bytes([b]) in self.ids)
        return out


@functools.lru_cache(maxsize=16)
def _characters(chars: str) -> _Characters:
    return _Characters(chars)


@functools.lru_cache(maxsize=16)
def tokenizer(chars: str) -> llguidance.LLTokenizer:
    """The tokenizer of a vocabulary's characters (``Vocabulary.chars``), built once."""
    # No slices: they speed up masks over 100,000-token vocabularies, not over a few hundred.
    wrapper = llguidance.TokenizerWrapper(_characters(chars))
    return llguidance.LLTokenizer(wrapper, slices=[])
