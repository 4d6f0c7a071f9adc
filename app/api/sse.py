"""The one SSE pump: the events of one or more generations, encoded by a protocol adapter,
written to the client as server-sent events.

One ``token`` event per character is the contract, but one socket write per character is
not: every event already waiting is sent in a single write. The events of a run of
characters are written from pre-encoded pieces (``CharEvents``): at many streams the event
loop writes tens of thousands of them a second, and each costs it the GIL the decode thread
waits for. A ``: ping`` comment goes out
after 15 s of silence, as FastAPI's own SSE support does.

``HandleStream`` is the response: it cancels its generations when the response ends,
however it ends (also when its body never started, for a client that left first), and
closes the connection of a reader the engine cut off for falling too far behind."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, format_sse_event
from starlette.types import Receive, Scope, Send

from app.engine import Done, Event, Failed, Handle

PING_S = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# (which generation, its event) -> bytes on the wire.
Encode = Callable[[int, Event], bytes]
# Whether a failure ended the stream -> the bytes that close it.
Tail = Callable[[bool], bytes]


def sse(event: str | None, data: str) -> bytes:
    return format_sse_event(event=event, data_str=data)


class CharEvents:
    """One SSE event per character of a run, from pieces encoded once: ``before``, then the
    character's index when ``numbered``, then ``middle``, the character as a JSON string and
    ``after``. The JSON strings are kept per character as they first come (a vocabulary's
    worth at most)."""

    def __init__(self, before: str, middle: str, after: str, numbered: bool = True):
        self.before, self.middle, self.after, self.numbered = before, middle, after, numbered
        self._tails: dict[str, str] = {}  # character -> middle + its JSON + after

    def run(self, index: int, text: str) -> bytes:
        """The events of ``text``, whose first character is character ``index``."""
        tails = self._tails
        try:
            if self.numbered:
                before = self.before
                return "".join(
                    [f"{before}{i}{tails[ch]}" for i, ch in enumerate(text, index)]
                ).encode()
            head = self.before
            return "".join([head + tails[ch] for ch in text]).encode()
        except KeyError:
            for ch in text:
                if ch not in tails:
                    tails[ch] = f"{self.middle}{json.dumps(ch)}{self.after}"
            return self.run(index, text)


# The native ``token`` event without logprobs: ``{"index":I,"text":"c"}``.
NATIVE_TOKENS = CharEvents('event: token\ndata: {"index":', ',"text":', "}\n\n")


async def pump(
    handles: Sequence[Handle], encode: Encode, head: bytes = b"", tail: Tail | None = None
) -> AsyncIterator[bytes]:
    """``head``, then each generation's events as they come (in order within each), then
    ``tail`` once every generation has ended or one has failed."""
    if head:
        yield head
    pending = dict(enumerate(handles))
    failed = False
    while pending and not failed:
        ready = await _next(pending)
        if not ready:
            yield KEEPALIVE_COMMENT
            continue
        parts = []
        for i, events in ready:
            for event in events:
                parts.append(encode(i, event))
                if isinstance(event, Done | Failed):
                    del pending[i]
                    failed = failed or isinstance(event, Failed)
        yield b"".join(parts)
    if tail is not None:
        yield tail(failed)


async def _next(pending: dict[int, Handle]) -> list[tuple[int, list[Event]]]:
    """The events waiting for any of the generations ([] after ``PING_S`` of silence)."""
    if len(pending) == 1:  # the common case, without a task per wait
        ((i, handle),) = pending.items()
        events = await handle.next(PING_S)
        return [(i, events)] if events else []
    tasks = {asyncio.ensure_future(h.next()): i for i, h in pending.items()}
    try:
        done, _ = await asyncio.wait(tasks, timeout=PING_S, return_when="FIRST_COMPLETED")
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    # A wait cancelled as another finished never took an event (the channel gives none then).
    return sorted((tasks[t], t.result()) for t in done)


class HandleStream(EventSourceResponse):
    def __init__(self, handles: Sequence[Handle], body: AsyncIterator[bytes]):
        super().__init__(body, headers=SSE_HEADERS)
        self.handles = handles

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The middleware's way to close this connection (uvicorn's transport; absent else).
        abort = scope.get("state", {}).get("abort_connection")
        watchers = [asyncio.ensure_future(self._close_if_cut_off(h, abort)) for h in self.handles]
        try:
            await super().__call__(scope, receive, send)
        finally:
            for w in watchers:
                w.cancel()
            for h in self.handles:
                h.cancel()

    @staticmethod
    async def _close_if_cut_off(handle: Handle, abort: Callable[[], None] | None) -> None:
        """A reader that falls ``CHARRNN_STREAM_BACKLOG`` characters behind has lost its row
        already; its writer may be stuck in a write that never ends, so close the socket."""
        await handle.cut_off()
        if abort is not None:
            abort()


async def disconnected(request: Request) -> None:
    """Returns when the client has gone away (for a whole-text request's wait)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
