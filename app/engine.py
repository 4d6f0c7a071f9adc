"""The scheduler, the event loop's side: admission (429 and 503 before any work), messages
to the model's decode thread (app/batcher.py), and the hand-over of its results into each
generation's event channel (app/channel.py).

Who owns what, as in TGI's router: the waiting queue, the primes in progress and the batch
belong to the decode thread; the set of live generations (what 429 counts) and every
channel belong to the event loop. A ``Generation`` is the handle both sides hold, and each of
its parts has one owner: the request is immutable, the ``StopMatcher`` is the decode
thread's, the channel the event loop's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

from app.backend import ModelBackend
from app.batcher import Batcher, Results
from app.channel import EventChannel
from app.generation import Failed, GenerationRequest, StopMatcher, Timings
from app.metrics import Metrics

log = logging.getLogger("charrnn.engine")


class Overloaded(Exception):
    """The batch and the waiting queue are full."""


class ShuttingDown(Exception):
    """The server no longer takes new generations."""


class Generation:
    """One submitted request."""

    __slots__ = ("channel", "request", "text", "timings")

    def __init__(self, request: GenerationRequest, backlog: int):
        self.request = request
        self.channel = EventChannel(backlog)  # the event loop's
        self.text = StopMatcher(request)  # the decode thread's
        self.timings = Timings()


class Scheduler:
    def __init__(
        self,
        name: str,
        backend: ModelBackend,
        metrics: Metrics,
        *,
        max_concurrent: int,
        max_queue: int,
        prime_budget: int,
        prime_slice_s: float,
    ):
        self.name = name
        self.backend = backend
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.batcher = Batcher(
            name,
            backend,
            metrics,
            max_concurrent=max_concurrent,
            prime_budget=prime_budget,
            prime_slice_s=prime_slice_s,
            hand_over=self._from_decode_thread,
        )
        # Generations someone still waits for: submitted, and neither ended nor cancelled.
        self._live: set[Generation] = set()
        self._closing = False
        # Why the model's decode keeps failing (``/ready`` 503, ``/info``), or None.
        self.failing: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- admission ---------------------------------------------------------------------------

    @property
    def load(self) -> int:
        return len(self._live)

    def submit(self, request: GenerationRequest, backlog: int) -> Generation:
        """Queue a generation, or raise before any work if it could not be queued."""
        if self._closing:
            raise ShuttingDown()
        if self.load >= self.max_concurrent + self.max_queue:
            raise Overloaded()
        gen = Generation(request, backlog)
        self._live.add(gen)
        self.batcher.submit(gen)
        return gen

    def cancel(self, gen: Generation) -> None:
        """Nobody waits for ``gen`` any more: its place is free for admission at once, and the
        decode thread drops it wherever it is before its next call."""
        if gen in self._live:
            self._live.discard(gen)
            self.batcher.cancel(gen)

    # -- results from the decode thread ------------------------------------------------------

    def _from_decode_thread(self, results: Results, failing: str | None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed under us: shutting down
                loop.call_soon_threadsafe(self._deliver, results, failing)

    def _deliver(self, results: Results, failing: str | None) -> None:
        self.failing = failing
        for gen, events in results:
            if gen not in self._live:
                continue  # cancelled: nobody reads it
            if not gen.channel.deliver(events):
                self.cancel(gen)  # cut off for reading too slowly
            elif gen.channel.closed:
                self._live.discard(gen)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self.batcher.run, name=f"decode-{self.name}", daemon=True
        )
        self._thread.start()

    async def drain(self, grace_s: float) -> None:
        """Refuse new work, let open generations run for up to ``grace_s``, then end the rest
        with an error event, so every open stream gets its final event."""
        self._closing = True
        deadline = time.monotonic() + grace_s
        while self._live and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for gen in list(self._live):
            gen.channel.fail(Failed("the server is shutting down", "unavailable"))
            self.cancel(gen)

    async def close(self) -> None:
        self.batcher.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
