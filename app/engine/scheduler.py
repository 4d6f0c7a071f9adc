"""The scheduler, the event loop's side of one model: admission (429 and 503 before any
work), messages to the model's decode thread (app/engine/loop.py), and the hand-over of its
results into each generation's event channel (app/engine/channel.py).

Who owns what, as in TGI's router: the waiting queue, the primes in progress and the batch
belong to the decode thread; the set of live generations (what 429 counts) and every channel
belong to the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from app.engine.handle import Generation, Handle
from app.engine.loop import DecodeLoop
from app.engine.outbox import Results
from app.engine.policy import Policy
from app.engine.request import Failed, GenerationRequest
from app.metrics import Metrics
from app.runner import ModelRunner


class Overloaded(Exception):
    """The batch and the waiting queue are full."""


class ShuttingDown(Exception):
    """The server no longer takes new generations."""


class Scheduler:
    def __init__(
        self,
        name: str,
        runner: ModelRunner,
        metrics: Metrics,
        *,
        max_concurrent: int,
        max_queue: int,
        prime_budget: int,
        prime_slice_s: float,
    ):
        self.name = name
        self.runner = runner
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        policy = Policy(
            max_concurrent,
            prime_budget,
            prime_slice_s,
            lockstep=runner.exact_steps,
            prime_align=runner.prime_align,
        )
        self.loop = DecodeLoop(name, runner, metrics, policy, self._from_decode_thread)
        self._cutoffs = metrics.cutoffs.labels(name)
        # Generations someone still waits for: submitted, and neither ended nor cancelled.
        self._live: set[Generation] = set()
        self._closing = False
        # Set once a retired model's last generation ended: the engine sends what comes
        # after to the model that serves the name now.
        self.stopped = False
        self.checkpoint = ""  # which weights serve (the engine's checkpoint id)
        # Why the model's decode keeps failing (``/ready`` 503, ``/info``), or None.
        self.failing: str | None = None
        self._thread: threading.Thread | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    # -- admission ---------------------------------------------------------------------------

    @property
    def live(self) -> int:
        """Generations submitted and neither ended nor cancelled."""
        return len(self._live)

    def submit(self, request: GenerationRequest, backlog: int) -> Handle:
        """Queue a generation, or raise before any work if it could not be queued."""
        if self._closing:
            raise ShuttingDown()
        if self.live >= self.max_concurrent + self.max_queue:
            raise Overloaded()
        gen = Generation(request, backlog)
        self._live.add(gen)
        self.loop.submit(gen)
        return Handle(gen, self._cancel, self.checkpoint)

    def submit_many(self, requests: list[GenerationRequest], backlog: int) -> list[Handle]:
        """Queue several generations that belong together (a request's samples), all or
        none: ``Overloaded`` if they do not all fit."""
        if self._closing:
            raise ShuttingDown()
        if self.live + len(requests) > self.max_concurrent + self.max_queue:
            raise Overloaded()
        return [self.submit(r, backlog) for r in requests]

    def _cancel(self, gen: Generation) -> None:
        if gen in self._live:
            self._live.discard(gen)
            self.loop.cancel(gen)

    # -- results from the decode thread ------------------------------------------------------

    def _from_decode_thread(self, results: Results, failing: str | None) -> None:
        loop = self._event_loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed under us: shutting down
                loop.call_soon_threadsafe(self._deliver, results, failing)

    def _deliver(self, results: Results, failing: str | None) -> None:
        self.failing = failing
        for gen, events in results:
            if gen not in self._live:
                continue  # cancelled: nobody reads it
            if not gen.channel.deliver(events):
                self._cutoffs.inc()
                self._cancel(gen)  # cut off for reading too slowly
            elif gen.channel.closed:
                self._live.discard(gen)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._thread = threading.Thread(
            target=self.loop.run, name=f"decode-{self.name}", daemon=True
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
            self._cancel(gen)

    async def close(self) -> None:
        self.loop.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
