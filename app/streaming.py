"""A generation's events delivered to its client: as server-sent events with writes
coalesced, or only the final event for whole-text requests.

One ``token`` event per character is the contract, but one socket write per character is
not: when a step produces characters faster than a client's writes complete, every event
already waiting is sent in a single write. A ``: ping`` comment goes out after 15 s of
silence, as FastAPI's own SSE support does. Neither function frees the generation's place
when the client leaves: the request's ``submitted`` dependency does (app/deps.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from app.engine import Generation
from app.generation import Done, Event, Failed

PING_S = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def close_when_cut_off(gen: Generation, model: str, request: Request) -> None:
    """A reader that falls ``CHARRNN_STREAM_BACKLOG`` characters behind loses its row at
    once (app/channel.py); this also closes its connection, so a stalled client holds nothing."""
    abort = request.scope.get("state", {}).get("abort_connection")
    counter = request.app.state.metrics.cutoffs.labels(model)

    def cut_off() -> None:
        counter.inc()
        if abort is not None:
            abort()

    gen.channel.on_cutoff = cut_off


def sse(event: str | None, data: str) -> bytes:
    return format_sse_event(event=event, data_str=data)


async def stream_events(
    gen: Generation, encode: Callable[[Event], bytes], head: bytes = b"", tail: bytes = b""
) -> AsyncIterator[bytes]:
    """``head``, then every event encoded (several per write when they are waiting), then
    ``tail`` after the final one."""
    channel = gen.channel
    if head:
        yield head
    while True:
        try:
            async with asyncio.timeout(PING_S):
                event: Event | None = await channel.get()
        except TimeoutError:
            yield KEEPALIVE_COMMENT
            continue
        parts = []
        while event is not None:
            parts.append(encode(event))
            if isinstance(event, Done | Failed):
                yield b"".join(parts) + tail
                return
            event = channel.get_nowait()
        yield b"".join(parts)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_final(gen: Generation, request: Request) -> Done | Failed | None:
    """The final event of a whole-text generation; None if the client goes away first."""

    async def final() -> Done | Failed:
        while True:
            event = await gen.channel.get()
            if isinstance(event, Done | Failed):
                return event

    result = asyncio.ensure_future(final())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (gone, result):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return result.result() if result.done() and not result.cancelled() else None
