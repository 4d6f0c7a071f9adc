"""The decode thread's results on their way to the event loop, and the model's health.

Results are handed over in batches: each hand-over costs the event loop a wake-up and a
socket write per stream, so a few milliseconds of characters go together (a request's first
character and every final event go at once). A failed unit of work fails the generations it
touched; ``FAILING_AFTER`` failures in a row mark the model failing (``/ready`` 503) until a
unit succeeds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from app.engine.request import Event, Failed

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
        self._pending: Results = []
        self._last = 0.0
        self._calls = 0
        self._failures = 0
        self.failing: str | None = None  # why the model is failing, once it is

    def add(self, gen: Generation, events: list[Event]) -> None:
        self._pending.append((gen, events))

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
        results, self._pending = self._pending, []
        self._last = time.perf_counter()
        self._calls = 0
        self._hand_over(results, self.failing)

    def failed(self, gens: list[Generation], exc: Exception) -> None:
        self._failures += 1
        reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        if self._failures >= FAILING_AFTER and self.failing is None:
            self.failing = f"decode failed {self._failures} times in a row; last: {reason}"
            log.error("model %s is failing: %s", self.name, self.failing)
        failed = Failed(f"generation failed inside the model ({reason})", "internal")
        self._pending.extend((g, [failed]) for g in gens)
        self.flush()

    def succeeded(self) -> None:
        if self._failures:
            self._failures = 0
            if self.failing is not None:
                log.info("model %s decodes again", self.name)
                self.failing = None
                self.flush(force=True)
