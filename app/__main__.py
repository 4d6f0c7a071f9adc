"""``python -m app``: serve with the configured host and port, with graceful shutdown."""

from __future__ import annotations

import logging
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from app.config import Settings
from charrnn.checkpoint import CheckpointError, load_checkpoint


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


def _describe(error: ValidationError) -> str:
    """One line for every bad ``CHARRNN_*`` variable: which one, what is wrong, what it got."""
    parts = []
    for e in error.errors():
        name = "CHARRNN_" + "_".join(str(part) for part in e["loc"]).upper()
        parts.append(f"{name}: {e['msg']} (got {e['input']!r})")
    return "; ".join(parts)


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as e:
        print(f"error: cannot start: {_describe(e)}", file=sys.stderr)
        return 1
    # Imported only now: app.main builds its module-level app (for `uvicorn app.main:app`)
    # from the environment, which would fail with a traceback on a bad setting.
    from app.main import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Refuse bad checkpoints with one line before any server starts.
    try:
        for path in settings.model_paths.values():
            load_checkpoint(path)
    except (CheckpointError, ValueError) as e:
        print(f"error: cannot start: {e}", file=sys.stderr)
        return 1
    app = create_app(settings)
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
