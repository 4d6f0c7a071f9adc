"""``python -m app``: serve with the configured host and port, with graceful shutdown."""

from __future__ import annotations

import logging
import sys
from types import FrameType

import uvicorn

from app.config import Settings
from app.main import create_app
from charrnn.checkpoint import CheckpointError, load_checkpoint


class Server(uvicorn.Server):
    """On SIGTERM/SIGINT, first turn /ready to 503 and start draining the generations, then
    let uvicorn close the listener and wait for the open streams to end."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.app
        begin = getattr(app.state, "begin_shutdown", None)
        if begin is not None and not self.should_exit:
            loop = getattr(app.state, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(begin)
        super().handle_exit(sig, frame)


def main() -> int:
    settings = Settings()
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
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
