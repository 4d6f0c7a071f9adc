"""The decode thread's results on their way to the event loop, and the model's health.

Results are handed over in batches: each hand-over costs the event loop a wake-up and a
socket write per stream, so a few milliseconds of characters go together (a request's first
character and every final event go at once). A row's runs of characters from the calls of one
hand-over are joined into one run: the event loop then queues, takes and encodes one object
per stream per hand-over, not one per decode call. A failed unit of work fails the generations it
touched; ``FAILING_AFTER`` failures in a row mark the model failing (``/ready`` 503) until a
unit succeeds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from app.engine.request import Event, Failed, TextRun

if TYPE_CHECKING:
    from app.engine.handle import Generation

log = logging.getLogger("charrnn.engine")

# Characters go to the event loop at most this often: still a continuous stream to a reader.
HAND_OVER_S = 0.02
# A hand-over also goes out after this many decode calls, so one holds at most
# HAND_OVER_CALLS * MAX_STEPS characters of a row: the least backlog a client may be given
# for a reader at full speed never to be cut off (MIN_BACKLOG).
HAND_OVER_CALLS = 16
FAILING_AFTER = 3

Results = list[tuple["Generation", list[Event]]]
HandOver = Callable[[Results, str | None], None]


class Outbox:
    def __init__(self, name: str, hand_over: HandOver):
        self.name = name
        self._hand_over = hand_over
        self._pending: dict[Generation, list[Event]] = {}  # in the order rows came
        self._last = 0.0
        self._calls = 0
        self._failures = 0
        self.failing: str | None = None  # why the model is failing, once it is

    def add(self, gen: Generation, events: list[Event]) -> None:
        queued = self._pending.setdefault(gen, [])
        for event in events:
            joined = _joined(queued[-1], event) if queued else None
            if joined is not None:
                queued[-1] = joined
            else:
                queued.append(event)

    def after_call(self, urgent: bool, priming: bool) -> None:
        """A decode call's results are in: hand them over if they are ``urgent`` (a first
        character, a final event), if primes are waiting (an iteration then takes a budget's
        prime work, and waiting longer would double the streams' gaps), or if it is time."""
        self._calls += 1
        due = time.perf_counter() - self._last >= HAND_OVER_S or priming
        if urgent or due or self._calls >= HAND_OVER_CALLS:
            self.flush()

    def flush(self, force: bool = False) -> None:
        if not self._pending and not force:
            return
        results, self._pending = list(self._pending.items()), {}
        self._last = time.perf_counter()
        self._calls = 0
        self._hand_over(results, self.failing)

    def failed(self, gens: list[Generation], exc: Exception) -> None:
        """A unit of work failed: its generations end with an error, and the model counts
        towards failing."""
        self._failures += 1
        reason = _reason(exc)
        if self._failures >= FAILING_AFTER and self.failing is None:
            self.failing = f"decode failed {self._failures} times in a row; last: {reason}"
            log.error("model %s is failing: %s", self.name, self.failing)
        for g in gens:
            self._pending.setdefault(g, []).append(_failed(reason))
        self.flush()

    def row_failed(self, gen: Generation, exc: Exception) -> None:
        """One row's own work failed (its events, not the network call): it ends with an
        error; the model is not failing for it, and the others of its call go on."""
        self._pending.setdefault(gen, []).append(_failed(_reason(exc)))

    def succeeded(self) -> None:
        if self._failures:
            self._failures = 0
            if self.failing is not None:
                log.info("model %s decodes again", self.name)
                self.failing = None
                self.flush(force=True)


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}".strip().splitlines()[0]


def _failed(reason: str) -> Failed:
    return Failed(f"generation failed inside the model ({reason})", "internal")


def _joined(a: Event, b: Event) -> TextRun | None:
    """``a`` then ``b`` as one run, if both are plain runs of characters and ``b`` goes on
    where ``a`` ends (runs with logprobs keep theirs apart: they are rarer, and longer)."""
    if not (isinstance(a, TextRun) and isinstance(b, TextRun)):
        return None
    if a.logprobs is not None or b.logprobs is not None or b.index != a.index + len(a.text):
        return None
    return TextRun(a.index, a.text + b.text)
