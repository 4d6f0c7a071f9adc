"""FastAPI dependencies shared by the routers.

Every dependency is ``async def`` although none awaits: FastAPI runs a plain ``def``
dependency in its thread pool, and a thread hop per dependency would cost a streaming request
time before its first character (and run admission off the event loop)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.engine import Engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
