"""The ASGI app: ``uvicorn app.main:app``.

Start-up loads every configured checkpoint (a bad one stops start-up with an error naming its
path), then warms the models up in the background; ``/ready`` turns 200 after that. Shutdown
refuses new work, lets open generations finish within a grace period and sends every open
stream its final event."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from app.api import errors
from app.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.config import Settings
from app.engine import Engine
from app.metrics import Metrics
from app.routes import admin, native, openai, ops, scoring
from charrnn.checkpoint import Checkpoint

log = logging.getLogger("charrnn")

DESCRIPTION = """A character-level LSTM text generator.

Native routes stream one character per server-sent event; `/v1/completions` speaks OpenAI's
completions protocol (a token is one character). Concurrent requests share one batched decode
step per character."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    # The decode thread runs torch's small ops holding the GIL; with Python's default 5 ms
    # switch interval the event loop could wait that long for every hand-over, which shows up
    # as time to first character and health-check latency. 0.5 ms keeps HTTP responsive.
    sys.setswitchinterval(0.0005)
    try:
        engine = await asyncio.to_thread(
            Engine.load, settings, app.state.metrics, app.state.checkpoints
        )
        app.state.checkpoints = None  # the runners hold them now
    except Exception as e:
        log.error("cannot start: %s", e)
        raise
    app.state.engine = engine
    app.state.loop = asyncio.get_running_loop()
    warm = asyncio.create_task(engine.warm_up(), name="warm-up")
    warm.add_done_callback(lambda task: _stop_if_failed(app, task))
    app.state.begin_shutdown = lambda: asyncio.ensure_future(
        engine.drain(settings.shutdown_grace_s)
    )
    reloads = _reload_on_sighup(engine)
    try:
        yield
    finally:
        reloads()
        if not warm.done():
            warm.cancel()
        await engine.drain(0 if engine.closing else settings.shutdown_grace_s)
        await engine.close()


def _reload_on_sighup(engine: Engine) -> Callable[[], None]:
    """``SIGHUP`` (a Kubernetes ConfigMap change, ``docker kill -s HUP``) re-reads
    ``CHARRNN_MODELS`` (the environment, then ``CHARRNN_ENV_FILE``) and applies the
    difference: new names load, changed paths swap, names gone unload, all without dropping
    a request. Returns what removes the handler."""
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers belong to the main thread (tests run elsewhere)

    async def reload() -> None:
        try:
            changes = await engine.reload(Settings().model_paths)
        except Exception as exc:  # a bad checkpoint or setting: the models served stay
            log.error("SIGHUP: models not reloaded: %s", exc)
            return
        log.info("SIGHUP: %s", "; ".join(changes) or "no change to the models")

    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    return lambda: loop.remove_signal_handler(signal.SIGHUP)


def _stop_if_failed(app: FastAPI, warm: asyncio.Task[None]) -> None:
    """A model that cannot generate at start-up must not be served: say why in one line and
    stop the server, which then exits non-zero (app/__main__.py)."""
    if warm.cancelled() or warm.exception() is None:
        return
    app.state.fatal = f"cannot start: {warm.exception()}"
    log.error("%s", app.state.fatal)
    os.kill(os.getpid(), signal.SIGTERM)


def create_app(
    settings: Settings | None = None, checkpoints: dict[str, Checkpoint] | None = None
) -> FastAPI:
    """The app; ``checkpoints`` already read (by ``python -m app``) are not read again."""
    settings = settings or Settings()
    app = FastAPI(
        title="CharRNN",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.checkpoints = checkpoints
    app.state.fatal = None  # why the server stopped itself, if it did
    app.state.metrics = Metrics()
    app.state.engine = Engine()  # empty until the lifespan has loaded the models
    errors.install(app)
    app.include_router(native.router)
    app.include_router(scoring.router)
    app.include_router(openai.router)
    app.include_router(ops.router)
    if settings.admin_key_list:
        app.include_router(admin.router)
    app.mount("/static", StaticFiles(packages=[("app", "static")]), name="static")
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        route_limits={"/score": settings.score_body_bytes},
    )
    app.add_middleware(RequestContextMiddleware, metrics=app.state.metrics)
    return app


app = create_app()
