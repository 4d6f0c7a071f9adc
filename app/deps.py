"""FastAPI dependencies shared by the routers.

Every dependency is ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in its thread pool, and a thread hop per dependency cost a streaming request
milliseconds before its first character (and ran admission off the event loop)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from app.config import Settings
from app.engine import Done, Event, Failed, Overloaded, ShuttingDown
from app.registry import Registry
from app.validation import Job


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]


def enqueue(job: Job) -> Job:
    """Hand the job to its model's scheduler, or answer 429/503 before any work."""
    try:
        job.model.scheduler.submit(job.gen)
    except Overloaded:
        raise HTTPException(
            429,
            "the server is at its limit of concurrent and queued generations; retry later",
            headers={"Retry-After": "1"},
        ) from None
    except ShuttingDown:
        raise HTTPException(
            503, "the server is shutting down", headers={"Retry-After": "5"}
        ) from None
    return job


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_final(job: Job, request: Request) -> Done | Failed | None:
    """The final event of a non-streaming generation; None (and the row freed) if the client
    goes away first."""

    async def final() -> Done | Failed:
        while True:
            event: Event = await job.gen.next_event()
            if isinstance(event, Done | Failed):
                return event

    result = asyncio.ensure_future(final())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            result.cancel()
            job.model.scheduler.cancel(job.gen)
        with contextlib.suppress(asyncio.CancelledError):
            await gone
    return result.result() if result.done() and not result.cancelled() else None
