"""The admin routes' adapter: a checkpoint path checked against the server's model folder,
and the engine's refusals as the HTTP statuses the contract names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from app.config import Settings
from app.engine import (
    DefaultModel,
    Engine,
    LoadedModel,
    ModelExists,
    UnknownModel,
    WarmUpFailed,
)
from charrnn.checkpoint import CheckpointError


def checkpoint_path(settings: Settings, path: str) -> str:
    """``path`` inside ``CHARRNN_MODEL_DIR`` (relative to it, or absolute within it), as the
    path the engine loads; a 422 naming ``path`` for anything outside or missing."""
    folder = Path(settings.model_dir).resolve()
    full = (folder / path).resolve()
    if not full.is_relative_to(folder):
        _refuse(f"path must be inside the model folder {settings.model_dir!r}")
    if not full.is_file():
        _refuse(f"no checkpoint file {path!r} in the model folder {settings.model_dir!r}")
    return str(full)


def _refuse(msg: str) -> None:
    raise RequestValidationError([{"type": "value_error", "loc": ("body", "path"), "msg": msg}])


async def load(engine: Engine, settings: Settings, name: str, path: str) -> LoadedModel:
    return await _apply(engine.add(name, checkpoint_path(settings, path)))


async def swap(engine: Engine, settings: Settings, name: str, path: str) -> LoadedModel:
    engine.get(name)  # 404 before any loading
    return await _apply(engine.swap(name, checkpoint_path(settings, path)))


async def unload(engine: Engine, name: str) -> None:
    await _apply(engine.unload(name))


async def _apply(work: Any) -> Any:
    """The engine's answer, or its refusal as 404, 409 or 422 (a corrupt checkpoint: the
    models served before keep serving)."""
    try:
        return await work
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from None
    except (ModelExists, DefaultModel) as exc:
        raise HTTPException(409, str(exc)) from None
    except (CheckpointError, WarmUpFailed) as exc:  # it does not load, or cannot generate
        msg = f"the checkpoint cannot be used: {exc}"
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("body", "path"), "msg": msg}]
        ) from None


def describe(model: LoadedModel) -> dict[str, Any]:
    return {"name": model.name, "path": model.path, "checkpoint": model.checkpoint}
