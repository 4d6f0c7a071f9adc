"""OpenAI-compatible ``/v1/models`` and ``/v1/completions`` (tokens are characters here)."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse

from app.admission import Submitted, resolve_model
from app.config import Settings
from app.deps import RegistryDep, SettingsDep, SubmittedDep
from app.engine import Generation
from app.errors import openai_error
from app.generation import Done, Event, TextRun
from app.registry import LoadedModel, Registry
from app.schemas import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    CompletionUsage,
    ModelCard,
    ModelList,
    OpenAIError,
)
from app.security import check_api_key
from app.streaming import SSE_HEADERS, close_when_cut_off, sse, stream_events, wait_final
from app.validation import validate_generation

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(check_api_key)])

_ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 404, 413, 429, 503)}


@router.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(registry: RegistryDep) -> ModelList:
    """The loaded models, in OpenAI's list shape."""
    return ModelList(
        data=[ModelCard(id=m.name, created=m.created) for m in registry.models.values()]
    )


def _submit(
    req: CompletionRequest, registry: Registry, settings: Settings, gens: Submitted
) -> tuple[LoadedModel, Generation]:
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise HTTPException(400, "prompt: exactly one prompt per request is supported")
        prompt = prompt[0]
    if not prompt:
        raise HTTPException(400, "prompt: must not be empty")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not 1 <= len(s) <= 64 for s in stop):
        raise HTTPException(400, "stop: at most 4 strings of 1 to 64 characters each")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_k = req.top_k
    if temperature == 0:  # OpenAI's greedy decoding
        temperature, top_k = 1.0, 1
    model = resolve_model(registry, req.model)
    request = validate_generation(
        model,
        settings,
        source="body",
        prime=prompt,
        max_new=req.max_tokens or 16,
        temperature=temperature,
        top_k=top_k,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=stop,
        field_names={"prime": "prompt", "max_new": "max_tokens"},
        stream=req.stream,
    )
    return model, gens.submit(model, request, settings.stream_backlog)


def _usage(gen: Generation, completion_chars: int) -> CompletionUsage:
    prompt_chars = len(gen.request.prime)
    return CompletionUsage(
        prompt_tokens=prompt_chars,
        completion_tokens=completion_chars,
        total_tokens=prompt_chars + completion_chars,
    )


@router.post(
    "/completions",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
)
async def completions(
    req: CompletionRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    gens: SubmittedDep,
) -> Completion | Response:
    """OpenAI text completion; with `stream: true`, `data:` chunks ending in `[DONE]`."""
    model, gen = _submit(req, registry, settings, gens)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        close_when_cut_off(gen, model.name, request)
        return _stream(model.name, gen, cid, created, usage)
    final = await wait_final(gen, request)
    if final is None:
        return Response(status_code=499)
    if not isinstance(final, Done):
        return openai_error(503 if final.type == "unavailable" else 500, final.message)
    return Completion(
        id=cid,
        created=created,
        model=model.name,
        choices=[CompletionChoice(text=final.generated_text, finish_reason=final.finish_reason)],
        usage=_usage(gen, len(final.generated_text)),
    )


def _stream(
    name: str, gen: Generation, cid: str, created: int, include_usage: bool
) -> EventSourceResponse:
    """``data:`` chunks of text_completion objects, one per character, then [DONE]."""

    def chunk(choices: list[dict], usage: CompletionUsage | None = None) -> bytes:
        body = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": choices,
            "usage": usage.model_dump() if usage else None,
        }
        return sse(None, json.dumps(body))

    def encode(event: Event) -> bytes:
        if isinstance(event, TextRun):  # one chunk per character
            return b"".join(
                chunk([{"index": 0, "text": ch, "finish_reason": None, "logprobs": None}])
                for ch in event.text
            )
        if isinstance(event, Done):
            last = chunk(
                [{"index": 0, "text": "", "finish_reason": event.finish_reason, "logprobs": None}]
            )
            if include_usage:
                last += chunk([], _usage(gen, len(event.generated_text)))
            return last
        return sse(
            None,
            json.dumps(
                {
                    "error": {
                        "message": event.message,
                        "type": event.type,
                        "param": None,
                        "code": None,
                    }
                }
            ),
        )

    return EventSourceResponse(
        stream_events(gen, encode, tail=sse(None, "[DONE]")), headers=SSE_HEADERS
    )
