"""Models at run time, behind an admin key: load a checkpoint under a name, swap a name to
another checkpoint, unload a name. Mounted only when ``CHARRNN_ADMIN_KEYS`` is set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from app.api import admin
from app.api.deps import EngineDep, SettingsDep
from app.api.security import check_admin_key
from app.schemas import LoadModel, SwapModel

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(check_admin_key)])

_ERRORS = {
    401: {"description": "no valid admin key"},
    404: {"description": "no model of that name"},
    409: {"description": "the name is taken (load), or is the default model (unload)"},
    422: {"description": "a path outside the model folder, or a checkpoint that cannot be used"},
}


@router.post("/models", responses=_ERRORS)
async def load_model(req: LoadModel, engine: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    """Load a checkpoint from the model folder under a new name, warm it up, then serve it."""
    return admin.describe(await admin.load(engine, settings, req.name, req.path))


@router.put("/models/{name}", responses=_ERRORS)
async def swap_model(
    name: str, req: SwapModel, engine: EngineDep, settings: SettingsDep
) -> dict[str, Any]:
    """Serve ``name`` from another checkpoint: requests admitted before finish on the old
    one, later ones use the new one, none fails; the old one's memory goes with its last
    generation."""
    return admin.describe(await admin.swap(engine, settings, name, req.path))


@router.delete("/models/{name}", status_code=204, responses=_ERRORS)
async def unload_model(name: str, engine: EngineDep) -> Response:
    """Stop serving ``name`` once its generations end (not the default model)."""
    await admin.unload(engine, name)
    return Response(status_code=204)
