"""Character vocabulary with a stable order: a character's id is its position in ``chars``.

The notebook built it from ``tuple(set(text))``, whose order changes with the hash seed, so a
checkpoint's ids meant different characters in the next process. Here a text's vocabulary is
its characters sorted, which makes the mapping a pure function of the corpus. A vocabulary
grown for continued training (``grow``) is its parent's, unchanged, followed by the new
text's characters that it lacks (sorted among themselves), so every old id keeps its meaning
and the parent's weights stay valid for them. Any string of unique characters is therefore a
vocabulary; old checkpoints' sorted ones load as they always did.
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
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary characters must be unique")
        object.__setattr__(self, "_index", {ch: i for i, ch in enumerate(self.chars)})

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls("".join(sorted(set(text))))

    def grow(self, chars: Iterable[str]) -> Vocabulary:
        """This vocabulary with the characters of ``chars`` it lacks appended, sorted among
        themselves: old ids keep their meaning. ``self`` when nothing is new."""
        new = sorted(set(chars) - self._index.keys())
        return Vocabulary(self.chars + "".join(new)) if new else self

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
