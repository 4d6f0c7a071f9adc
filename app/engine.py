"""The scheduler: a bounded queue in front of one continuously batched decode loop per model.

The decode loop runs on its own thread. Each iteration it takes waiting requests into the
batch (their primes warmed up in one pass each, or taken from the prime cache),
drops finished, stopped and cancelled rows, and advances **every** active row with one
batched call: one character while a row waits for its first, else (native kernels) as many
as fit in ``CALL_S``. Each row's characters of a call go on as one run, and the runs go to the
event loop in one hand-over, so the event loop streams call *n* while the thread already
computes call *n + 1*, and HTTP, health checks and new arrivals never wait behind the model
(torch releases the GIL in its kernels)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.backend import Batch, ModelBackend
from app.metrics import Metrics

log = logging.getLogger("charrnn.engine")

FinishReason = Literal["length", "stop"]

# Characters are handed to the event loop at most this often (a final event or a request's
# first character goes at once). Each hand-over costs the event loop a wake-up and a socket
# write per stream; batching a few milliseconds of characters makes that cost per write, not
# per character, and leaves the GIL to the decode thread: with 32 streams, 5 ms meant 6,400
# writes/s on one core. 20 ms (50 updates/s) still reads as a continuous stream.
HAND_OVER_S = 0.02
# With the native kernels one decode call makes several characters per row, paying the Python
# around a step (~50 us at batch 1: the ids into lists, the bookkeeping, the metrics) and the
# wait for the GIL after it once for all of them. A call is sized to take about CALL_S, so a
# request that arrives meanwhile waits at most about that long to join the batch, and a
# client's disconnect takes effect as soon. 3 ms (three steps at batch 32) streamed ~8% more
# than 1 ms to 32 clients; 5 ms no more than 3 ms.
CALL_S = 0.003
MAX_STEPS = 32


class Overloaded(Exception):
    """The batch and the waiting queue are full."""


class ShuttingDown(Exception):
    """The server no longer takes new generations."""


@dataclass
class Token:
    """A run of newly released characters: ``text[k]`` is character ``index + k`` of the
    generated text. One event per character on the wire; one object per run here, so the
    decode thread and the event loop handle a run, not each character."""

    index: int
    text: str


@dataclass
class Done:
    generated_text: str
    finish_reason: FinishReason


@dataclass
class Failed:
    message: str
    type: str


Event = Token | Done | Failed


@dataclass
class Generation:
    """One request's life in the scheduler. Its events arrive on ``events``, in order.

    The decode thread owns the text (``push``); the event loop owns the queue (``deliver``)
    and may set ``cancelled`` at any time, which takes the row out before the next step."""

    prime: str
    max_new: int
    temperature: float
    top_k: int | None
    top_p: float
    seed: int
    stop: list[str]
    backlog: int
    # False for whole-text (non-streaming) requests: only the final event is produced.
    stream: bool = True
    # Called (on the event loop) when the client is cut off for reading too slowly; the
    # route uses it to close the connection.
    on_cutoff: Callable[[], None] | None = None
    # Events for the event loop; ``queued`` counts the characters of those not yet taken.
    events: asyncio.Queue[Event] = field(init=False)
    queued: int = 0
    chars: list[str] = field(default_factory=list)
    emitted: int = 0
    finished: bool = False  # no more characters will be generated
    cancelled: bool = False  # the client left, was too slow, or the server is closing
    closed: bool = False  # the final event is in the queue
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    t_warm: float = 0.0
    t_end: float = 0.0

    def __post_init__(self) -> None:
        # Bounded by ``backlog`` characters (``deliver``), not by a count of events.
        self.events = asyncio.Queue()

    # -- text bookkeeping (decode thread) ------------------------------------------------------

    def _held_back(self, tail: str) -> int:
        """Characters at the end of the text (``tail`` is its end) that may be the start of a
        stop string: they are not streamed until it is clear, so the streamed text never
        contains a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), hold, -1):
                if tail.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _tail(self) -> str:
        """The end of the text, as long as the longest stop string."""
        return "".join(self.chars[len(self.chars) - max(map(len, self.stop)) :])

    def _append(self, text: str) -> FinishReason | None:
        """Add characters up to the length limit; whether that ended the generation."""
        self.chars.extend(text[: self.max_new - len(self.chars)])
        return "length" if len(self.chars) >= self.max_new else None

    def _append_until_stop(self, text: str) -> FinishReason | None:
        """Add characters one at a time: the generation ends where a stop string first ends
        (which is not kept), or at the length limit."""
        for ch in text:
            self.chars.append(ch)
            tail = self._tail()
            for s in self.stop:
                if tail.endswith(s):
                    del self.chars[len(self.chars) - len(s) :]
                    return "stop"
            if len(self.chars) >= self.max_new:
                return "length"
        return None

    def push(self, text: str) -> list[Event]:
        """Add generated characters; returns the events they release: the released run as
        one ``Token``, then the final event. Characters after the end are dropped."""
        if self.finished:
            return []
        reason = self._append_until_stop(text) if self.stop else self._append(text)
        upto = len(self.chars)
        if reason is None and self.stop:
            upto -= self._held_back(self._tail())
        out: list[Event] = []
        if self.stream and upto > self.emitted:
            out.append(Token(self.emitted, "".join(self.chars[self.emitted : upto])))
        self.emitted = max(self.emitted, upto)
        if reason is not None:
            self.finished = True
            self.t_end = time.perf_counter()
            out.append(Done("".join(self.chars), reason))
        return out

    # -- the queue (event loop) --------------------------------------------------------------

    def deliver(self, events: list[Event]) -> None:
        for event in events:
            if self.closed:
                return
            if isinstance(event, Token):
                if self.queued + len(event.text) > self.backlog:
                    # The client reads slower than we generate: cut it off rather than
                    # buffer without bound. Its unread backlog is replaced by the final event.
                    self._cut_off()
                    return
                self.queued += len(event.text)
            self.events.put_nowait(event)
            if isinstance(event, Done | Failed):
                self.closed = True

    def _cut_off(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()
        self.queued = 0
        self.cancelled = True
        self.fail(Failed("the client read too slowly; stream cut off", "slow_client"))
        log.warning("cut off a client %d characters behind", self.backlog)
        if self.on_cutoff is not None:
            self.on_cutoff()

    async def next_event(self) -> Event:
        """The next event, waiting for it."""
        return self._taken(await self.events.get())

    def next_event_nowait(self) -> Event | None:
        """The next event if one is waiting."""
        return None if self.events.empty() else self._taken(self.events.get_nowait())

    def _taken(self, event: Event) -> Event:
        if isinstance(event, Token):
            self.queued -= len(event.text)
        return event

    def fail(self, event: Failed) -> None:
        """End the generation now with an error event (event loop only)."""
        self.finished = True
        self.t_end = self.t_end or time.perf_counter()
        if not self.closed:
            self.closed = True
            self.events.put_nowait(event)

    def timings(self) -> dict[str, float]:
        end = self.t_end or time.perf_counter()
        gen_s = max(end - self.t_warm, 1e-9) if self.t_warm else 0.0
        return {
            "queue_ms": round(max(self.t_start - self.t_submit, 0) * 1e3, 3),
            "warmup_ms": round(max(self.t_warm - self.t_start, 0) * 1e3, 3),
            "generate_ms": round(gen_s * 1e3, 3),
            "chars_per_s": round(len(self.chars) / gen_s, 1) if gen_s else 0.0,
        }


class Scheduler:
    def __init__(
        self,
        name: str,
        backend: ModelBackend,
        metrics: Metrics,
        max_concurrent: int,
        max_queue: int,
    ):
        self.name = name
        self.backend = backend
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.waiting: deque[Generation] = deque()
        self.rows: list[Generation] = []
        # Taken from the queue and being primed: counted in ``load`` so that admission does
        # not see a free slot while a prime runs.
        self.joining: list[Generation] = []
        self.batch: Batch | None = None
        self._closing = False
        self._stopped = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[Generation, list[Event]]] = []
        self._last_hand_over = 0.0
        # Seconds per step at each batch size, from the last call at that size.
        self._step_s: dict[int, float] = {}
        # The per-step series, looked up once: ``labels()`` costs more than ``observe()``.
        self._inter_char = metrics.inter_char_seconds.labels(name)
        self._batch_size = metrics.batch_size.labels(name)
        self._generated = metrics.generated_chars.labels(name)
        self._decode_seconds = metrics.decode_seconds.labels(name)
        self._ttfc = metrics.ttfc_seconds.labels(name)

    # -- admission (event loop) --------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self.rows) + len(self.joining) + len(self.waiting)

    def check_capacity(self) -> None:
        """Raise before any work if a new generation could not be queued."""
        if self._closing:
            raise ShuttingDown()
        if self.load >= self.max_concurrent + self.max_queue:
            raise Overloaded()

    def submit(self, gen: Generation) -> Generation:
        self.check_capacity()
        self.waiting.append(gen)
        self.metrics.queue_depth.labels(self.name).set(len(self.waiting))
        self._wake.set()
        return gen

    def cancel(self, gen: Generation) -> None:
        """The client went away: the row leaves the batch before the next step."""
        if not gen.finished:
            gen.cancelled = True
            gen.finished = True
            self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"decode-{self.name}", daemon=True)
        self._thread.start()

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, let open generations run for up to ``grace_s``, then end the rest
        with an error event, so every open stream gets its final event."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        while self.load and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for gen in [*self.waiting, *self.joining, *self.rows]:
            gen.fail(Failed("the server is shutting down", "unavailable"))
        self._wake.set()

    async def close(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- the decode loop (its own thread) ----------------------------------------------------

    def _run(self) -> None:
        with self.backend.worker():
            self._loop_until_stopped()

    def _loop_until_stopped(self) -> None:
        while not self._stopped:
            self._drop_finished()
            if not self.rows and not self.waiting:
                self._hand_over([])
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self._admit()
                if self.batch is not None:
                    self._step()
            except Exception:
                log.exception("decode loop failed for model %s", self.name)
                failed = [*self.rows, *self.joining]
                self.rows, self.joining, self.batch = [], [], None
                self._hand_over(
                    [
                        (g, [Failed("generation failed inside the model", "internal")])
                        for g in failed
                    ]
                )

    def _hand_over(self, results: list[tuple[Generation, list[Event]]], now: bool = True) -> None:
        """Give events to the event loop in one call: at once when ``now``, else when
        ``HAND_OVER_S`` has passed since the last hand-over."""
        self._pending.extend(results)
        t = time.perf_counter()
        if not self._pending or (not now and t - self._last_hand_over < HAND_OVER_S):
            return
        batch, self._pending, self._last_hand_over = self._pending, [], t
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed under us: shutting down
                self._loop.call_soon_threadsafe(_deliver_all, batch)

    def _drop_finished(self) -> None:
        keep = [i for i, g in enumerate(self.rows) if not g.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.batch = self.batch.select(keep) if keep and self.batch is not None else None
        self._set_gauges()

    def _admit(self) -> None:
        while self.waiting and len(self.rows) + len(self.joining) < self.max_concurrent:
            gen = self.waiting[0]
            if not gen.finished:
                self.joining.append(gen)  # before it leaves the queue: never uncounted
            self.waiting.popleft()
        if not self.joining:
            return
        parts = []
        for gen in self.joining:
            gen.t_start = time.perf_counter()
            part, cached = self.backend.new_row(
                gen.prime, gen.temperature, gen.top_k, gen.top_p, gen.seed
            )
            gen.t_warm = time.perf_counter()
            self.metrics.prime_cache.labels(self.name, "hit" if cached else "miss").inc()
            parts.append(part)
        merged = [self.batch] if self.batch is not None else []
        self.batch = Batch.concat(merged + parts)
        self.rows.extend(self.joining)
        self.joining = []
        self._set_gauges()

    def _step(self) -> None:
        assert self.batch is not None
        rows = self.rows
        # A row waiting for its first character gets it before the network step runs.
        early = any(not g.chars for g in rows)
        steps = 1 if early else self._steps()
        positions = np.fromiter((len(g.chars) for g in rows), dtype=np.uint64, count=len(rows))
        t0 = time.perf_counter()
        self.batch = self.backend.advance(self.batch, positions, self._emit, steps, early)
        elapsed = time.perf_counter() - t0
        per_step = elapsed / steps
        self._step_s[len(rows)] = per_step
        self._decode_seconds.inc(elapsed)
        self._inter_char.observe(per_step)
        self._batch_size.observe(len(rows))

    def _steps(self) -> int:
        """Characters per row for the next call: as many as fit in ``CALL_S`` at this batch
        size and every row still wants (one without the native kernels)."""
        rows = self.rows
        if not self.backend.multi_step:
            return 1
        per_step = self._step_s.get(len(rows))
        if per_step is None:
            return 1  # this batch size has not been timed yet
        left = min(g.max_new - len(g.chars) for g in rows)
        return max(1, min(MAX_STEPS, left, int(CALL_S / per_step)))

    def _emit(self, runs: list[list[int]]) -> None:
        """Characters just sampled, one list of ids per row: each row's run into its text,
        and its events on. A row that finishes part-way through a run drops the rest."""
        now = time.perf_counter()
        decode = self.backend.vocab.decode
        results = []
        generated = 0
        urgent = False  # a first character or a final event: no reason to wait
        for gen, ids in zip(self.rows, runs, strict=True):
            if gen.finished:
                continue
            if not gen.chars:
                self._ttfc.observe(now - gen.t_submit)
                urgent = True
            results.append((gen, gen.push(decode(ids))))
            generated += len(ids)
            urgent = urgent or gen.finished
        self._generated.inc(generated)
        self._hand_over(results, now=urgent)

    def _set_gauges(self) -> None:
        self.metrics.active.labels(self.name).set(len(self.rows))
        self.metrics.queue_depth.labels(self.name).set(len(self.waiting))


def _deliver_all(results: list[tuple[Generation, list[Event]]]) -> None:
    for gen, events in results:
        gen.deliver(events)
