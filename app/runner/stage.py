"""The per-row stage between the network and the sampler: each row's own sampling work, held
with the batch so that its rows' order is theirs.

Two kinds of work live here:

- the generation controls (charrnn/controls.py: biases, penalties, DRY, bans, min-p,
  typical-p), whose state the native sampler reads and advances inside the fused
  multi-character call: rows with controls keep it;
- a constraint (charrnn/structured): the row's matcher and the mask of characters that may
  continue its match. A mask depends on every character drawn before it, so a batch with a
  constrained row decodes in runs of masked steps instead (``masked_steps``).

Either may draw "end" (id V): a constraint's match is over, or the bans forbid every
character. A batch in which no row has per-row work has no stage (``Batch.stage`` is None)
and pays nothing. With a stage, the rows without work sample exactly as without one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from charrnn.controls import ControlsBatch
from charrnn.model import State
from charrnn.structured import MaskStepper, Matcher

MAX_RUN = 32

# One native call of ``steps`` characters with these masks ([B, W] or [steps, B, W]):
# the ids [steps, B], the logits and state after it, and the logits seen (when asked).
MaskedCall = Callable[
    [int, torch.Tensor], tuple[torch.Tensor, torch.Tensor, State, torch.Tensor | None]
]


@dataclass(frozen=True)
class RowStage:
    """One row's own sampling work, which the runner owns for as long as the row decodes:
    its constraint's matcher, and its controls' state (one row of a ``ControlsBatch``)."""

    matcher: Matcher | None = None
    controls: ControlsBatch | None = None


@dataclass
class BatchStage:
    """``rows[b]``: row b's stage (None: no per-row work); ``masks`` [B, W] int32 on the CPU,
    where llguidance writes the constrained rows' masks."""

    rows: list[RowStage | None]
    masks: torch.Tensor
    end: int  # "end": the vocabulary's size
    # Every row's controls (rows without: plain ones), or None when no row has any.
    controls: ControlsBatch | None = None
    # How many steps the next masked call guesses the masks hold for: it doubles while
    # guesses hold, up to MAX_RUN, and drops to what held when one fails. A row that joins
    # starts it again (its first masks often change: "end" once a match is complete); rows
    # that leave keep it.
    run: int = 4

    @classmethod
    def of(cls, row: RowStage, words: int, end: int) -> BatchStage:
        return cls([row], _allow_all(1, words, end), end, row.controls)

    @functools.cached_property
    def matchers(self) -> list[tuple[int, Matcher]]:
        """The constrained rows: (row, its matcher)."""
        return [(b, r.matcher) for b, r in enumerate(self.rows) if r and r.matcher]

    @property
    def fusable(self) -> bool:
        """Whether the rows can take the fused multi-character call, which samples inside:
        not while a row's mask depends on the characters drawn before it."""
        return not self.matchers

    def select(self, keep: list[int]) -> BatchStage | None:
        """The rows ``keep``; None when none of them has per-row work."""
        rows = [self.rows[i] for i in keep]
        if all(r is None for r in rows):
            return None
        controls = None
        if any(r is not None and r.controls is not None for r in rows):
            assert self.controls is not None
            controls = self.controls.select(keep)
        # Their guesses still hold.
        return BatchStage(rows, self.masks[keep], self.end, controls, self.run)

    @staticmethod
    def concat(parts: Sequence[tuple[BatchStage | None, int]]) -> BatchStage | None:
        """Parts of ``n`` rows each, in order (None: n rows without per-row work)."""
        present = [c for c, _ in parts if c is not None]
        if not present:
            return None
        words, end = present[0].masks.shape[1], present[0].end
        rows: list[RowStage | None] = []
        masks = []
        for c, n in parts:
            rows += c.rows if c is not None else [None] * n
            masks.append(c.masks if c is not None else _allow_all(n, words, end))
        controls = None
        if any(c.controls is not None for c in present):
            controls = ControlsBatch.concat(
                [
                    c.controls
                    if c is not None and c.controls is not None
                    else ControlsBatch.plain(n, end)
                    for c, n in parts
                ]
            )
        return BatchStage(rows, torch.cat(masks), end, controls)

    @functools.cached_property
    def stepper(self) -> MaskStepper:
        """Fills every constrained row's mask for its next character, and moves each matcher
        on by the id its row drew ("end" leaves it)."""
        return MaskStepper(self.matchers, self.masks)

    def fill(self) -> torch.Tensor:
        self.stepper.fill()
        return self.masks

    def advance(self, ids: Sequence[int]) -> None:
        self.stepper.advance(ids)

    def masked_steps(
        self, call: MaskedCall, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor, State, torch.Tensor | None]:
        """Up to ``steps`` characters per row through ``call``, on a guess that each row's
        mask for its next character holds for a run of them (a regex's character class often
        does): the matchers then check the guess along the draws. Where a mask changed at
        step s, the draws before s stand (they were made with their true masks) and the call
        is made again for s + 1 steps, step s with its true masks: the same ids, bit for bit,
        as one step at a time. A grammar whose masks change at every character costs about
        one step per call, as without the guess. Returns what the last call returned; its
        ids have the steps that ran."""
        stepper = self.stepper
        stepper.fill()
        run = min(steps, self.run)
        # The controls move on in place as the call draws: a replay starts from a copy.
        before = self.controls.select(range(len(self.rows))) if self.controls else None
        out = call(run, stepper.masks)
        walk = stepper.walk(out[0].tolist())
        if walk.true is None:
            self.run = min(2 * run, MAX_RUN)
            return out
        held = walk.held
        masks = stepper.masks.expand(held + 1, *stepper.masks.shape).clone()
        masks[held] = walk.true
        self.controls = before
        out = call(held + 1, masks)
        stepper.settle(walk, out[0][held].tolist())
        self.run = held + 1
        return out


def _allow_all(rows: int, words: int, end: int) -> torch.Tensor:
    """The mask of a row without a constraint: every character, but not "end" (it forbids
    nothing, so it samples as without a mask; and a copy guard's forbidden mass must not
    become "end" here, as it would not without a mask)."""
    masks = torch.full((rows, words), -1, dtype=torch.int32)
    masks[:, end >> 5] &= ~(torch.tensor(1, dtype=torch.int32) << (end & 31))  # 31: the sign
    return masks


# "End" (id V, one past the vocabulary) is a row's last draw: its match is over, or its bans
# left no character. These two read it, for the network and for the row's text; nothing else
# in the service does.


def network_chars(ids: torch.Tensor, stage: BatchStage | None) -> torch.Tensor:
    """The characters the network reads after drawing ``ids``: "end" reads as character 0
    (the row's text is over; what the network makes of it is never used)."""
    if stage is None:
        return ids
    return torch.where(ids == stage.end, 0, ids)


def text_run(ids: list[int], end: int) -> tuple[list[int], bool]:
    """A row's draws as its text: the characters before "end", and whether it drew it."""
    if end in ids:
        return ids[: ids.index(end)], True
    return ids, False
