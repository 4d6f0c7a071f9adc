"""A submitted generation: the record both threads share, and the handle its consumer holds.

``Generation`` has one owner per part: the request is immutable, the ``StopMatcher`` is the
decode thread's, the channel and the timings' reading the event loop's.

``Handle`` is all a consumer (a route, the warm-up) sees: the events as they come, the final
result, ``cancel()``. It cancels itself when its consumer goes away, as an async context
(``async with handle``) or through ``result``, whatever way they end: a generation nobody
reads is never decoded on. Cancelling one that has ended does nothing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType

from app.engine.channel import EventChannel
from app.engine.request import Done, Event, Failed, GenerationRequest, Timings
from app.engine.stops import StopMatcher


class GenerationFailed(Exception):
    """A whole-text generation ended in a failure (the model failed, or the server is
    shutting down): ``failed`` says which."""

    def __init__(self, failed: Failed):
        super().__init__(failed.message)
        self.failed = failed


# Keys that name a generation to the model runner: never reused, unlike ``id()``.
_keys = itertools.count()


class Generation:
    __slots__ = ("channel", "key", "matcher", "request", "timings")

    def __init__(self, request: GenerationRequest, backlog: int):
        self.key = next(_keys)
        self.request = request
        self.channel = EventChannel(backlog)  # the event loop's
        self.matcher = StopMatcher(request)  # the decode thread's
        self.timings = Timings()


class Handle:
    def __init__(self, gen: Generation, cancel: Callable[[Generation], None], checkpoint: str = ""):
        self._gen = gen
        self._cancel = cancel
        self.checkpoint = checkpoint  # which weights serve it

    @property
    def request(self) -> GenerationRequest:
        return self._gen.request

    @property
    def timings(self) -> Timings:
        return self._gen.timings

    def cancel(self) -> None:
        """Nobody waits for this generation any more: its place is free at once, and the
        decode thread drops it wherever it is before its next call."""
        self._cancel(self._gen)

    async def __aenter__(self) -> Handle:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()

    async def next(self, timeout: float | None = None) -> list[Event]:
        """Every event waiting now, at least one: waits for it up to ``timeout`` seconds
        ([] when they pass). After the final event there are no more."""
        channel = self._gen.channel
        try:
            async with asyncio.timeout(timeout):
                first = await channel.get()
        except TimeoutError:
            return []
        events = [first]
        while not isinstance(events[-1], Done | Failed):
            event = channel.get_nowait()
            if event is None:
                break
            events.append(event)
        return events

    async def events(self) -> AsyncIterator[Event]:
        """The events one at a time, to the final one; cancels when the iteration ends."""
        async with self:
            while True:
                for event in await self.next():
                    yield event
                    if isinstance(event, Done | Failed):
                        return

    async def result(self, disconnected: Awaitable[None] | None = None) -> Done | None:
        """The final event of the generation; None if ``disconnected`` (the client going
        away) completes first. Raises ``GenerationFailed`` for a failure."""

        async def final() -> Done | Failed:
            async for event in self.events():
                if isinstance(event, Done | Failed):
                    return event
            raise AssertionError("a generation's events end with its final event")

        async with self:
            result = asyncio.ensure_future(final())
            gone = asyncio.ensure_future(disconnected) if disconnected is not None else None
            try:
                await asyncio.wait(
                    {result, *([gone] if gone else [])}, return_when="FIRST_COMPLETED"
                )
            finally:
                for task in (gone, result):
                    if task is not None and not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
            if not result.done() or result.cancelled():
                return None
            event = result.result()
            if isinstance(event, Failed):
                raise GenerationFailed(event)
            return event

    async def cut_off(self) -> None:
        """Returns when the client was cut off for reading too slowly (app/engine/channel.py):
        its connection should be closed, since its writer may never finish a write."""
        await self._gen.channel.cut_off.wait()


async def results(handles: list[Handle], disconnected: Awaitable[None]) -> list[Done] | None:
    """The final event of every generation of one request (its samples, its prompts); None
    if ``disconnected`` (the client going away) completes first. A failed one fails them all
    (``GenerationFailed``); the others are cancelled."""
    tasks = [asyncio.ensure_future(h.result()) for h in handles]
    gone = asyncio.ensure_future(disconnected)
    try:
        finished = asyncio.ensure_future(asyncio.gather(*tasks))
        await asyncio.wait({finished, gone}, return_when="FIRST_COMPLETED")
        if not finished.done():
            finished.cancel()
            return None
        return [d for d in finished.result() if d is not None]
    finally:
        gone.cancel()
        for t in tasks:
            t.cancel()
        for h in handles:
            h.cancel()
