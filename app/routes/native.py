"""Native generation: ``POST /generate`` (JSON) and ``POST|GET /generate/stream`` (SSE)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from app.api import native
from app.api.deps import EngineDep, SettingsDep
from app.api.security import check_api_key
from app.api.sse import HandleStream, disconnected
from app.engine import results
from app.schemas import GenerateRequest, GenerateResponse

router = APIRouter(tags=["generation"], dependencies=[Depends(check_api_key)])

_ERRORS = {
    401: {"description": "API keys are configured and none valid was sent"},
    404: {"description": "unknown model"},
    413: {"description": "request body too large"},
    422: {
        "description": "invalid parameters, e.g. prime characters outside the vocabulary or a "
        "constraint that does not compile"
    },
    429: {"description": "the batch and the queue are full; see Retry-After"},
    503: {"description": "not ready yet, or shutting down"},
}
_SSE_DOC = {
    200: {
        "description": "`start`, one `token` per character, then `done` (or `error`)",
        "content": {"text/event-stream": {}},
    },
    **_ERRORS,
}


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def generate(
    req: GenerateRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> GenerateResponse | Response:
    """Generate text after a prime and return it whole (with ``n``, several samples)."""
    model = engine.model(req.model)
    asked = await native.to_requests(req, model, settings, "body", stream=False)
    handles = engine.submit_many(model, asked.requests)
    dones = await results(handles, disconnected(request))
    if dones is None:  # the client left; nobody reads this
        return Response(status_code=499)
    return native.response(model, asked, handles, dones)


async def _stream(req: GenerateRequest, source: str, engine: EngineDep, settings: SettingsDep):
    model = engine.model(req.model)
    asked = await native.to_requests(req, model, settings, source, stream=True)
    return native.stream(model, asked, engine.submit_many(model, asked.requests))


@router.post("/generate/stream", response_model=None, responses=_SSE_DOC)
async def generate_stream(
    req: GenerateRequest, engine: EngineDep, settings: SettingsDep
) -> HandleStream:
    """Stream the generation as server-sent events (JSON body)."""
    return await _stream(req, "body", engine, settings)


@router.get("/generate/stream", response_model=None, responses=_SSE_DOC)
async def generate_stream_get(
    req: Annotated[GenerateRequest, Query()], engine: EngineDep, settings: SettingsDep
) -> HandleStream:
    """Stream the generation as server-sent events (query parameters, for EventSource and
    `curl -N`; repeat `stop` for several stop strings)."""
    return await _stream(req, "query", engine, settings)
