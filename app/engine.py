"""The scheduler: a bounded queue in front of one continuously batched decode loop per model.

Each loop iteration takes waiting requests into the batch (their primes warmed up in one
sequence pass each, or taken from the prime cache), then advances **every** active row by one
character with a single batched step. Finished, stopped, cancelled and too-slow rows leave the
batch before the next step. The torch work runs on a dedicated worker thread so the event loop
keeps serving HTTP while the model computes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.backend import Batch, ModelBackend
from app.metrics import Metrics

log = logging.getLogger("charrnn.engine")

FinishReason = Literal["length", "stop"]


class Overloaded(Exception):
    """The batch and the waiting queue are full."""


class ShuttingDown(Exception):
    """The server no longer takes new generations."""


@dataclass
class Token:
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
    """One request's life in the scheduler. Events arrive on ``events``, in order."""

    prime: str
    max_new: int
    temperature: float
    top_k: int | None
    top_p: float
    seed: int
    stop: list[str]
    backlog: int
    events: asyncio.Queue[Event] = field(init=False)
    chars: list[str] = field(default_factory=list)
    emitted: int = 0
    finished: bool = False
    cancelled: bool = False
    prime_cached: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float = 0.0
    t_warm: float = 0.0
    t_first: float = 0.0
    t_end: float = 0.0

    def __post_init__(self) -> None:
        # One slot more than the backlog so the final event always fits.
        self.events = asyncio.Queue(maxsize=self.backlog + 1)

    # -- text bookkeeping (runs on the event loop) -------------------------------------------

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that may be the start of a stop string: they are
        not streamed until it is clear, so the streamed text never contains a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def push(self, ch: str) -> bool:
        """Add one generated character; returns True once the generation is finished."""
        self.chars.append(ch)
        text = "".join(self.chars) if self.stop else None
        reason: FinishReason | None = None
        if text is not None:
            for s in self.stop:
                if text.endswith(s):
                    del self.chars[len(self.chars) - len(s) :]
                    reason = "stop"
                    break
        if reason is None and len(self.chars) >= self.max_new:
            reason = "length"
        upto = len(self.chars)
        if reason is None and text is not None:
            upto -= self._held_back(text)
        for i in range(self.emitted, upto):
            self._put(Token(i, self.chars[i]))
        self.emitted = max(self.emitted, upto)
        if reason is not None:
            self.finish(Done("".join(self.chars), reason))
        return self.finished

    def _put(self, event: Event) -> None:
        try:
            self.events.put_nowait(event)
        except asyncio.QueueFull:
            # The client reads slower than we generate: cut it off rather than buffer
            # without bound. Its unread backlog is dropped and replaced by the final event.
            while not self.events.empty():
                self.events.get_nowait()
            self.cancelled = True
            self.finish(Failed("the client read too slowly; stream cut off", "slow_client"))

    def finish(self, event: Done | Failed) -> None:
        """Deliver the final event, once."""
        if self.t_end:
            return
        self.finished = True
        self.t_end = time.perf_counter()
        with contextlib.suppress(asyncio.QueueFull):
            self.events.put_nowait(event)

    @property
    def text(self) -> str:
        return "".join(self.chars)

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
        self.batch: Batch | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # One thread: torch calls for this model are serialised, never concurrent.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decode-{name}")

    # -- admission ---------------------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self.rows) + len(self.waiting)

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
        self._task = asyncio.create_task(self._run(), name=f"scheduler-{self.name}")

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, let open generations run for up to ``grace_s``, then end the rest
        with an error event, so every open stream gets its final event."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        while self.load and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for gen in [*self.waiting, *self.rows]:
            gen.finish(Failed("the server is shutting down", "unavailable"))
        self._wake.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    async def run_in_worker(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._drop_finished()
            if not self.rows and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._admit()
            if self.batch is None:
                continue
            await self._step()

    def _drop_finished(self) -> None:
        keep = [i for i, g in enumerate(self.rows) if not g.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self.batch = self.batch.select(keep) if keep and self.batch is not None else None
        self._set_gauges()

    async def _admit(self) -> None:
        joining: list[Generation] = []
        while self.waiting and len(self.rows) + len(joining) < self.max_concurrent:
            gen = self.waiting.popleft()
            if not gen.finished:
                joining.append(gen)
        if not joining:
            return
        now = time.perf_counter()
        for gen in joining:
            gen.t_start = now
        try:
            parts = await self.run_in_worker(self._warm_up, joining)
        except Exception:
            log.exception("warm-up failed for model %s", self.name)
            for gen in joining:
                gen.finish(Failed("the model failed to warm up on this prime", "internal"))
            self._set_gauges()
            return
        now = time.perf_counter()
        for gen in joining:
            gen.t_warm = now
        live = [(g, p) for g, p in zip(joining, parts, strict=True) if not g.finished]
        if live:
            merged = [self.batch] if self.batch is not None else []
            self.batch = Batch.concat(merged + [p for _, p in live])
            self.rows.extend(g for g, _ in live)
        self._set_gauges()

    def _warm_up(self, joining: list[Generation]) -> list[Batch]:
        parts = []
        for gen in joining:
            part, cached = self.backend.new_row(
                gen.prime, gen.temperature, gen.top_k, gen.top_p, gen.seed
            )
            gen.prime_cached = cached
            self.metrics.prime_cache.labels(self.name, "hit" if cached else "miss").inc()
            parts.append(part)
        return parts

    async def _step(self) -> None:
        assert self.batch is not None
        rows = list(self.rows)
        positions = np.fromiter((len(g.chars) for g in rows), dtype=np.uint64, count=len(rows))
        t0 = time.perf_counter()
        try:
            ids, self.batch = await self.run_in_worker(self.backend.advance, self.batch, positions)
        except Exception:
            log.exception("decode step failed for model %s", self.name)
            for gen in rows:
                gen.finish(Failed("generation failed inside the model", "internal"))
            self.rows, self.batch = [], None
            self._set_gauges()
            return
        now = time.perf_counter()
        m = self.metrics
        m.inter_char_seconds.labels(self.name).observe(now - t0)
        m.batch_size.labels(self.name).observe(len(rows))
        m.generated_chars.labels(self.name).inc(len(rows))
        decode = self.backend.vocab.decode_one
        for gen, i in zip(rows, ids, strict=True):
            if gen.finished:
                continue
            if not gen.chars:
                gen.t_first = now
                m.ttfc_seconds.labels(self.name).observe(now - gen.t_submit)
            gen.push(decode(i))

    def _set_gauges(self) -> None:
        self.metrics.active.labels(self.name).set(len(self.rows))
        self.metrics.queue_depth.labels(self.name).set(len(self.waiting))
