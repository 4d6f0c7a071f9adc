"""OpenAI-compatible ``/v1/models`` and ``/v1/completions`` (tokens are characters here)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.api import openai
from app.api.deps import EngineDep, SettingsDep
from app.api.security import check_api_key
from app.api.sse import HandleStream, disconnected
from app.engine import LoadedModel, results
from app.schemas import Completion, CompletionRequest, ModelCard, ModelList, OpenAIError

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(check_api_key)])

_ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 404, 413, 429, 503)}


def _card(model: LoadedModel) -> ModelCard:
    return ModelCard(id=model.name, created=model.created, checkpoint=model.checkpoint)


@router.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(engine: EngineDep) -> ModelList:
    """The loaded models, in OpenAI's list shape."""
    return ModelList(data=[_card(m) for m in engine.models.values()])


@router.get("/models/{model_id}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model_id: str, engine: EngineDep) -> ModelCard:
    """One loaded model (404 in OpenAI's error shape if unknown)."""
    return _card(engine.get(model_id))


@router.post(
    "/completions",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
)
async def completions(
    req: CompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> Completion | HandleStream | Response:
    """OpenAI text completion; with `stream: true`, `data:` chunks ending in `[DONE]`."""
    model = engine.model(req.model)
    jobs, drawn, inputs = await openai.to_requests(req, model, settings)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    handles = engine.submit_many(model, jobs)
    if req.stream:
        return openai.stream(model.name, handles, req, cid, created)
    dones = await results(handles, disconnected(request))
    if dones is None:
        return Response(status_code=499)
    return openai.completion(model.name, cid, created, handles, dones, req, drawn, inputs)
