"""FastAPI dependencies shared by the routers.

Every dependency is ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in its thread pool, and a thread hop per dependency cost a streaming request
milliseconds before its first character (and ran admission off the event loop)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request

from app.admission import Submitted
from app.config import Settings
from app.registry import Registry


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_registry(request: Request) -> Registry:
    return request.app.state.registry


async def submitted() -> AsyncIterator[Submitted]:
    """The request's generations. FastAPI leaves a request-scoped ``yield`` dependency only
    after the response has been sent, or when the request's task ends any other way
    (cancelled before a stream's body started, an error): whatever is still running is
    cancelled then, so nothing decodes for a client that is gone."""
    gens = Submitted()
    try:
        yield gens
    finally:
        gens.cancel_all()


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
SubmittedDep = Annotated[Submitted, Depends(submitted)]
