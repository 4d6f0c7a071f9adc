"""``python -m app``: serve with the configured host and port, with graceful shutdown.

Every setting is a ``CHARRNN_*`` environment variable (app/config.py); ``--host``, ``--port``
and ``--models`` override the three a command line most often changes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable
from types import FrameType
from typing import NoReturn

import uvicorn
from pydantic import ValidationError

from app.config import Settings
from charrnn.checkpoint import CheckpointError, load_checkpoint
from charrnn.model import resolve_device


class Server(uvicorn.Server):
    """Graceful shutdown in the order a load balancer needs: on the first SIGTERM/SIGINT,
    /ready turns 503 and new generations are refused while open ones finish (up to
    ``CHARRNN_SHUTDOWN_GRACE_S``, then they get an error event); only then does uvicorn close
    the listener and exit. A second signal exits at once."""

    draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app
        loop = getattr(app.state, "loop", None)
        if self.draining or self.should_exit or loop is None:
            self._exit_now(sig)
            return
        self.draining = True

        def begin() -> None:
            task = app.state.begin_shutdown()
            task.add_done_callback(lambda _: self._exit_now(sig))

        loop.call_soon_threadsafe(begin)

    def _exit_now(self, sig: int) -> None:
        super().handle_exit(sig, None)
        # uvicorn re-raises captured signals after shutting down, which would end the process
        # "killed by SIGTERM"; a completed graceful drain is a clean exit (status 0).
        self._captured_signals.clear()


class _Parser(argparse.ArgumentParser):
    """argparse that refuses a bad command line in one line (its usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv: list[str] | None) -> dict[str, object]:
    """The settings given on the command line, as ``Settings`` keyword arguments (which take
    precedence over the environment)."""
    parser = _Parser(
        prog="python -m app",
        description="Serve CharRNN models over HTTP (the playground at /, the API at /docs).",
        epilog="Every other setting is a CHARRNN_* environment variable; see the README's "
        "Configuration section. A flag overrides its variable.",
    )
    parser.add_argument(
        "--host", help="address to listen on (CHARRNN_HOST, default 127.0.0.1; 0.0.0.0: all)"
    )
    parser.add_argument("--port", type=int, help="port to listen on (CHARRNN_PORT, default 8000)")
    parser.add_argument(
        "--models",
        metavar="NAME=PATH[,...]",
        help="comma-separated name=path checkpoints, the first the default model "
        "(CHARRNN_MODELS, default alice=models/alice.pt)",
    )
    args = parser.parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}


def _describe(error: ValidationError, flags: Iterable[str] = ()) -> str:
    """One line for every bad setting: which variable (or flag), what is wrong, what it got."""
    parts = []
    for e in error.errors():
        field = "_".join(str(part) for part in e["loc"])
        name = f"--{field}" if field in flags else f"CHARRNN_{field.upper()}"
        parts.append(f"{name}: {e['msg']} (got {e['input']!r})")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    flags = _parse_args(argv)
    try:
        settings = Settings(**flags)
    except ValidationError as e:
        print(f"error: cannot start: {_describe(e, flags)}", file=sys.stderr)
        return 1
    # Imported only now: app.main builds its module-level app (for `uvicorn app.main:app`)
    # from the environment, which would fail with a traceback on a bad setting.
    from app.main import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Refuse bad checkpoints with one line before any server starts; the app serves these,
    # read once.
    try:
        device = resolve_device(settings.device)
        checkpoints = {n: load_checkpoint(p, device) for n, p in settings.model_paths.items()}
    except (CheckpointError, ValueError) as e:
        print(f"error: cannot start: {e}", file=sys.stderr)
        return 1
    app = create_app(settings, checkpoints)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
        access_log=False,
    )
    server = Server(config)
    server.run()
    if app.state.fatal:
        print(f"error: {app.state.fatal}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
