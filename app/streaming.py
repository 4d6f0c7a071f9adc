"""Server-sent events from a generation's event queue, with writes coalesced.

One ``token`` event per character is the contract, but one socket write per character is
not: when a step produces characters faster than a client's writes complete, every event
already waiting is sent in a single write. A ``: ping`` comment goes out after 15 s of
silence, as FastAPI's own SSE support does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event

from app.engine import Done, Event, Failed
from app.validation import Job

PING_S = 15.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def close_when_cut_off(job: Job, request: Request) -> None:
    """A reader that falls ``CHARRNN_STREAM_BACKLOG`` characters behind loses its row at
    once (app/engine.py); this also closes its connection, so a stalled client holds nothing."""
    abort = request.scope.get("state", {}).get("abort_connection")
    counter = request.app.state.metrics.cutoffs.labels(job.model.name)

    def cut_off() -> None:
        counter.inc()
        if abort is not None:
            abort()

    job.gen.on_cutoff = cut_off


def sse(event: str | None, data: str) -> bytes:
    return format_sse_event(event=event, data_str=data)


async def stream_events(
    job: Job, encode: Callable[[Event], bytes], head: bytes = b"", tail: bytes = b""
) -> AsyncIterator[bytes]:
    """``head``, then every event encoded (several per write when they are waiting), then
    ``tail`` after the final one. Leaving early (a disconnect) frees the row."""
    gen = job.gen
    try:
        if head:
            yield head
        while True:
            try:
                async with asyncio.timeout(PING_S):
                    event: Event | None = await gen.next_event()
            except TimeoutError:
                yield KEEPALIVE_COMMENT
                continue
            parts = []
            while event is not None:
                parts.append(encode(event))
                if isinstance(event, Done | Failed):
                    yield b"".join(parts) + tail
                    return
                event = gen.next_event_nowait()
            yield b"".join(parts)
    finally:
        job.model.scheduler.cancel(job.gen)
