"""OpenAI-compatible ``/v1/models`` and ``/v1/completions`` (tokens are characters here)."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse

from app.deps import RegistryDep, SettingsDep, enqueue, wait_final
from app.engine import Done, Event, Token
from app.errors import openai_error
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
from app.streaming import SSE_HEADERS, close_when_cut_off, sse, stream_events
from app.validation import Job, build_job

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(check_api_key)])

_ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 404, 413, 429, 503)}


@router.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(registry: RegistryDep) -> ModelList:
    """The loaded models, in OpenAI's list shape."""
    return ModelList(
        data=[ModelCard(id=m.name, created=m.created) for m in registry.models.values()]
    )


def _job(req: CompletionRequest, registry: RegistryDep, settings: SettingsDep) -> Job:
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
    job = build_job(
        registry,
        settings,
        source="body",
        model=req.model,
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
    return enqueue(job)


def _usage(job: Job, completion_chars: int) -> CompletionUsage:
    prompt_chars = len(job.gen.prime)
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
    req: CompletionRequest, request: Request, registry: RegistryDep, settings: SettingsDep
) -> Completion | Response:
    """OpenAI text completion; with `stream: true`, `data:` chunks ending in `[DONE]`."""
    job = _job(req, registry, settings)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        close_when_cut_off(job, request)
        return _stream(job, cid, created, usage)
    final = await wait_final(job, request)
    if final is None:
        return Response(status_code=499)
    if not isinstance(final, Done):
        return openai_error(503 if final.type == "unavailable" else 500, final.message)
    return Completion(
        id=cid,
        created=created,
        model=job.model.name,
        choices=[CompletionChoice(text=final.generated_text, finish_reason=final.finish_reason)],
        usage=_usage(job, len(final.generated_text)),
    )


def _stream(job: Job, cid: str, created: int, include_usage: bool) -> EventSourceResponse:
    """``data:`` chunks of text_completion objects, one per character, then [DONE]."""
    name = job.model.name

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
        if isinstance(event, Token):  # one chunk per character
            return b"".join(
                chunk([{"index": 0, "text": ch, "finish_reason": None, "logprobs": None}])
                for ch in event.text
            )
        if isinstance(event, Done):
            last = chunk(
                [{"index": 0, "text": "", "finish_reason": event.finish_reason, "logprobs": None}]
            )
            if include_usage:
                last += chunk([], _usage(job, len(event.generated_text)))
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
        stream_events(job, encode, tail=sse(None, "[DONE]")), headers=SSE_HEADERS
    )
