"""The batch's constrained rows: one matcher per row that has a constraint, and the masks the
sampler reads (charrnn/structured.py), kept with the batch so that its rows' order is theirs.

A batch without a constrained row has none of this (``Batch.constraints`` is None). With one,
``fill`` writes every constrained row's mask, the sampler draws with them (rows without a
constraint keep a mask that allows everything, so they draw exactly as without one), and
``advance`` moves the matchers on by the ids drawn. The native
runner draws several steps with one set of masks and checks afterwards that they held
(``MaskStepper.walk``; ``run`` is how many it guesses).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from charrnn.structured import MaskStepper, Matcher

MAX_RUN = 32


@dataclass
class RowConstraints:
    """``matchers[b]``: row b's matcher (None: no constraint); ``masks`` [B, W] int32 on the
    CPU, where llguidance writes them."""

    matchers: list[Matcher | None]
    masks: torch.Tensor
    # How many steps the next call guesses the masks hold for (ModelRunner._masked_steps):
    # it doubles while guesses hold, up to MAX_RUN, and drops to what held when one fails. A
    # row that joins starts it again (its first masks often change: "end" once a match is
    # complete); rows that leave keep it.
    run: int = 4

    @classmethod
    def of(cls, matcher: Matcher, words: int) -> RowConstraints:
        return cls([matcher], _allow_all(1, words))

    @property
    def end(self) -> int:
        """The id of "end": the vocabulary's size."""
        return next(m for m in self.matchers if m is not None).end

    def select(self, keep: list[int]) -> RowConstraints | None:
        """The rows ``keep``; None when none of them has a constraint."""
        matchers = [self.matchers[i] for i in keep]
        if all(m is None for m in matchers):
            return None
        return RowConstraints(matchers, self.masks[keep], self.run)  # their guesses still hold

    @staticmethod
    def concat(parts: Sequence[tuple[RowConstraints | None, int]]) -> RowConstraints | None:
        """Parts of ``n`` rows each, in order (None: n rows without a constraint)."""
        present = [c for c, _ in parts if c is not None]
        if not present:
            return None
        words = present[0].masks.shape[1]
        matchers: list[Matcher | None] = []
        masks = []
        for c, n in parts:
            matchers += c.matchers if c is not None else [None] * n
            masks.append(c.masks if c is not None else _allow_all(n, words))
        return RowConstraints(matchers, torch.cat(masks))

    @functools.cached_property
    def stepper(self) -> MaskStepper:
        """Fills every constrained row's mask for its next character, and moves each matcher
        on by the id its row drew ("end" leaves it)."""
        rows = [(b, m) for b, m in enumerate(self.matchers) if m is not None]
        return MaskStepper(rows, self.masks)

    def fill(self) -> torch.Tensor:
        self.stepper.fill()
        return self.masks

    def advance(self, ids: Sequence[int]) -> None:
        self.stepper.advance(ids)


def _allow_all(rows: int, words: int) -> torch.Tensor:
    return torch.full((rows, words), -1, dtype=torch.int32)
