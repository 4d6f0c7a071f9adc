"""A compiled constraint (``Grammar``), each constrained row's place in its match (``Matcher``),
and the masks of characters that may come next, filled for a batch's rows and checked along
several draws at once (``MaskStepper``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import llguidance
import numpy as np
import torch

from charrnn.structured.spec import Constraint
from charrnn.structured.tokens import tokenizer
from charrnn.vocab import Vocabulary


@dataclass(frozen=True)
class Grammar:
    """A constraint compiled for one vocabulary: shared by every row that uses it."""

    constraint: Constraint
    vocab_size: int
    template: llguidance.LLMatcher  # never advanced: each row advances a copy

    def matcher(self) -> Matcher:
        return Matcher(self)


def new_masks(rows: int, vocab: Vocabulary) -> torch.Tensor:
    """int32 bitmasks [rows, W] for ``vocab``'s constrained rows, as llguidance fills them and
    the sampler reads them (bit j of row b: character j may come next; bit V: the match may
    end here; the bits past V are llguidance's own). They start allowing everything: a row
    without a constraint keeps that and samples exactly as without a mask."""
    words = (tokenizer(vocab.chars).vocab_size + 31) // 32
    return torch.full((rows, words), -1, dtype=torch.int32)


def allowed(masks: torch.Tensor, row: int, tokens: int) -> np.ndarray:
    """Bool [tokens]: which of the first ``tokens`` ids row ``row``'s mask allows."""
    bits = np.unpackbits(masks[row].numpy().view(np.uint8), bitorder="little")
    return bits[:tokens].astype(bool)


class Matcher:
    """One constrained row's place in its match."""

    def __init__(self, grammar: Grammar):
        self.grammar = grammar
        self.end = grammar.vocab_size  # the id of "end" in masks and samples
        self._matcher = grammar.template.deep_copy()

    @property
    def done(self) -> bool:
        """A complete match that cannot go on. (An incomplete one that no character of the
        vocabulary continues shows in its mask instead, which then allows neither a
        character nor "end": the sampler ends the row.)"""
        return self._matcher.is_stopped()

    @property
    def matched(self) -> bool:
        """Whether the characters consumed so far are a complete match."""
        return self._matcher.is_accepting()

    def rollback(self, chars: int) -> None:
        """Forget the last ``chars`` characters (a stop string the text will not keep)."""
        if chars and not self._matcher.rollback(chars):
            raise RuntimeError(f"cannot roll back {chars} characters: {self.error}")

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class MaskStepper:
    """A batch's constrained rows made ready for many steps: each step fills their masks
    (row ``b``'s into row ``b`` of ``masks``, an int32 CPU tensor from ``new_masks``) and moves
    their matchers on by the ids drawn, with as little as possible around llguidance's own
    calls, which run without the GIL. A row that no character of the vocabulary continues
    gets a mask without any (the sampler then ends it).

    ``walk`` checks a guess that the masks will hold for several steps (the sampler then
    draws them all in one native call): it moves the matchers along the draws for as long as
    their masks stay the ones the draws were made with."""

    def __init__(self, rows: Sequence[tuple[int, Matcher]], masks: torch.Tensor):
        # Straight to the tensor's memory, as llguidance's numpy helpers do after checks that
        # would cost more than a row's mask.
        assert masks.dtype == torch.int32 and masks.is_contiguous() and masks.device.type == "cpu"
        self.masks = masks
        self.end = rows[0][1].end if rows else -1
        self._rows = [(b, m._matcher) for b, m in rows]
        self._bytes = masks.shape[1] * 4
        # The bits the sampler reads (characters and "end"): a guess held where these agree.
        words = masks.shape[1]
        bits = np.zeros(words * 32, dtype=bool)
        bits[: self.end + 1] = True
        self._read = np.packbits(bits, bitorder="little").view(np.int32)
        # walk's masks: rows without a constraint keep their mask (every character) here.
        self._true = masks.clone()

    def fill(self) -> None:
        self._fill(self._rows, self.masks)

    def _fill(self, rows: Sequence[tuple[int, llguidance.LLMatcher]], into: torch.Tensor) -> None:
        base, size = into.data_ptr(), self._bytes
        for b, matcher in rows:
            matcher.unsafe_compute_mask_ptr(base + b * size, size)

    def advance(self, ids: Sequence[int]) -> None:
        """``ids[b]``: what row ``b`` drew (its matcher stays where it is on "end")."""
        self._move(self._rows, ids)

    def _move(self, rows: Sequence[tuple[int, llguidance.LLMatcher]], ids: Sequence[int]) -> None:
        _consume([(m, ids[b]) for b, m in rows if ids[b] != self.end])

    def walk(self, drawn: Sequence[Sequence[int]]) -> Walk:
        """``drawn[s][b]``: row b's draw at step s, every step drawn through ``masks`` (filled
        before step 0). Moves each row's matcher along its draws while its mask for the next
        step is still its row of ``masks``, and says how far that held (``Walk``). A row that
        drew "end" is over: its matcher stops there and its later draws are not its text."""
        held, true = self.masks.numpy(), self._true.numpy()
        true[:] = held  # rows that are over (or free) agree with the guess from here on
        live = self._rows
        last = len(drawn)
        for s in range(1, last + 1):
            before = drawn[s - 1]
            live = [(b, m) for b, m in live if before[b] != self.end]
            self._move(live, before)
            if s == last or not live:
                return Walk(last)
            self._fill(live, self._true)
            # Every row compared: one that is over keeps the last mask it had, which agreed.
            if ((held ^ true) & self._read).any():
                return Walk(s, self._true, live)
        return Walk(last)

    def settle(self, walk: Walk, ids: Sequence[int]) -> None:
        """After a ``walk`` that stopped at step s: moves the rows still live there by
        ``ids[b]``, their draws at s made again with the true masks."""
        self._move(walk.live, ids)


@dataclass
class Walk:
    """How far a guess that the masks hold went: ``held`` steps had their true masks. Where
    that is not every step, ``true`` [B, W] is the masks step ``held`` should have had and
    ``live`` the rows still matching there (the matchers moved on by the draws before it)."""

    held: int
    true: torch.Tensor | None = None
    live: list[tuple[int, llguidance.LLMatcher]] = field(default_factory=list)


def fill_masks(rows: Sequence[tuple[int, Matcher]], masks: torch.Tensor) -> None:
    """Write each constrained row's mask into its row of ``masks`` (``MaskStepper``)."""
    MaskStepper(rows, masks).fill()


def advance(rows: Sequence[tuple[Matcher, int]]) -> None:
    """Move each matcher on by the id its row drew: a character, or "end", which leaves the
    matcher where it is (the row is over)."""
    _consume([(matcher._matcher, i) for matcher, i in rows if i != matcher.end])


def _consume(pairs: list[tuple[llguidance.LLMatcher, int]]) -> None:
    # One call per row on this thread: a character vocabulary's mask and step cost llguidance
    # ~1.4 us a row, and its thread pool, woken again after each network step, ~7 us in the
    # decode loop (bench/README.md). A character the mask allowed is always consumed; were
    # one not, its matcher would stop in an error state, and the row end unmatched.
    for matcher, i in pairs:
        matcher.consume_token(i)
