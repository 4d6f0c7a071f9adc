"""A prime in progress on the decode thread, and the scores a scored prime gathers as its
parts run (``/score``, OpenAI's ``echo`` with ``logprobs``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from app.engine.request import Logprobs, Scored
from app.runner import ModelRunner, Top
from charrnn.model import State

if TYPE_CHECKING:
    from app.engine.handle import Generation


@dataclass
class Priming:
    """``ids`` [T], ``done`` of them run; the logits and state so far. A scored prime also
    gathers, part by part, the logprob of each character from ``score_from`` on given those
    before it."""

    gen: Generation
    ids: torch.Tensor
    done: int = 0
    logits: torch.Tensor | None = None
    state: State | None = None
    logprobs: list[float] = field(default_factory=list)
    top: list[Top] = field(default_factory=list)

    @property
    def left(self) -> int:
        return self.ids.shape[0] - self.done

    @property
    def scored(self) -> bool:
        return self.gen.request.score_from is not None

    def advanced(self, n: int, logits: torch.Tensor, state: State) -> None:
        """``n`` more positions run; ``logits`` [1, V] after the last."""
        self.done += n
        self.logits, self.state = logits, state

    def collect(self, runner: ModelRunner, start: int, logits: torch.Tensor) -> None:
        """Scores from the logits after positions ``start``, ``start + 1``, … ([n, V]): row
        i gives the distribution of character ``start + i + 1``."""
        request = self.gen.request
        assert request.score_from is not None
        lo = max(start + 1, request.score_from)
        hi = min(start + logits.shape[0], self.ids.shape[0] - 1)  # inclusive
        if lo > hi:
            return
        rows = logits[lo - 1 - start : hi - start]
        chosen, top = runner.logprobs(rows, self.ids[lo : hi + 1], request.score_top)
        self.logprobs.extend(chosen)
        if top is not None:
            self.top.extend(top)

    def scores(self) -> Scored:
        """The scored part of the finished prime; a first character with nothing before it
        has no logprob."""
        request = self.gen.request
        start = request.score_from or 0
        head: list[float | None] = [None] if start == 0 else []
        top: list[Top | None] | None = None
        if request.score_top:
            top = [None] * len(head) + list(self.top)
        tokens = request.prime[start:]
        return Scored(start, Logprobs(tokens, head + list(self.logprobs), top))
