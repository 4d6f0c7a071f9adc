"""Character vocabulary with a stable order.

The notebook built it from ``tuple(set(text))``, whose order changes with the hash seed, so a
checkpoint's ids meant different characters in the next process. Here the characters are
sorted, which makes the mapping a pure function of the corpus.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


class UnknownCharactersError(ValueError):
    """Raised when text holds characters the vocabulary does not know."""

    def __init__(self, unknown: list[tuple[str, int]]):
        self.unknown = unknown
        listed = ", ".join(f"{ch!r} at position {pos}" for ch, pos in unknown)
        super().__init__(f"characters not in the model's vocabulary: {listed}")


@dataclass(frozen=True)
class Vocabulary:
    chars: str
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("a vocabulary needs at least one character")
        if list(self.chars) != sorted(set(self.chars)):
            raise ValueError("vocabulary characters must be unique and sorted")
        object.__setattr__(self, "_index", {ch: i for i, ch in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: object) -> bool:
        return ch in self._index

    def unknown(self, text: str) -> list[tuple[str, int]]:
        """Each character of ``text`` missing from the vocabulary, with its first position."""
        if self._index.keys() >= set(text):  # the usual case, without a Python loop
            return []
        seen: dict[str, int] = {}
        for pos, ch in enumerate(text):
            if ch not in self._index and ch not in seen:
                seen[ch] = pos
        return list(seen.items())

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[ch] for ch in text]
        except KeyError:
            raise UnknownCharactersError(self.unknown(text)) from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = self.chars
        return "".join(chars[i] for i in ids)
