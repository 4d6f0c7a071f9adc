"""The one SSE pump: the events of one or more generations, encoded by a protocol adapter,
written to the client as server-sent events.

One ``token`` event per character is the contract, but one socket write per character is
not: every event already waiting is sent in a single write. A ``: ping`` comment goes out
after 15 s of silence, as FastAPI's own SSE support does.

``HandleStream`` is the response: it cancels its generations when the response ends,
however it ends (also when its body never started, for a client that left first), and
closes the connection of a reader the engine cut off for falling too far behind."""

from __future__ import annotations

import asyncio
import contextlib
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
