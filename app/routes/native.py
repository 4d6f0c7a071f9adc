"""Native generation: ``POST /generate`` (JSON) and ``POST|GET /generate/stream`` (SSE)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse

from app.deps import RegistryDep, SettingsDep, enqueue, wait_final
from app.engine import Done, Event, Failed, Token
from app.schemas import GenerateRequest, GenerateResponse, StreamError, Usage
from app.security import check_api_key
from app.streaming import SSE_HEADERS, close_when_cut_off, sse, stream_events
from app.validation import Job, build_job

router = APIRouter(tags=["generation"], dependencies=[Depends(check_api_key)])

_ERRORS = {
    401: {"description": "API keys are configured and none valid was sent"},
    404: {"description": "unknown model"},
    413: {"description": "request body too large"},
    422: {"description": "invalid parameters, e.g. prime characters outside the vocabulary"},
    429: {"description": "the batch and the queue are full; see Retry-After"},
    503: {"description": "not ready yet, or shutting down"},
}


def _job(
    req: GenerateRequest,
    registry: RegistryDep,
    settings: SettingsDep,
    source: str,
    stream: bool = True,
) -> Job:
    return enqueue(
        build_job(
            registry,
            settings,
            source=source,
            model=req.model,
            prime=req.prime,
            max_new=req.max_new_chars,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
            stop=req.stop,
            stream=stream,
        )
    )


def _result(job: Job, done: Done) -> dict:
    gen = job.gen
    return {
        "generated_text": done.generated_text,
        "finish_reason": done.finish_reason,
        "seed": gen.seed,
        "usage": Usage(prime_chars=len(gen.prime), generated_chars=len(done.generated_text)),
        "timings": gen.timings(),
    }


@router.post("/generate", response_model=GenerateResponse, responses=_ERRORS)
async def generate(
    req: GenerateRequest, request: Request, registry: RegistryDep, settings: SettingsDep
) -> GenerateResponse | Response:
    """Generate text after a prime and return it whole."""
    job = _job(req, registry, settings, "body", stream=False)
    final = await wait_final(job, request)
    if final is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if isinstance(final, Failed):
        status = 503 if final.type == "unavailable" else 500
        return Response(
            json.dumps({"detail": final.message}), status_code=status, media_type="application/json"
        )
    return GenerateResponse(model=job.model.name, prime=job.gen.prime, **_result(job, final))


async def body_job(req: GenerateRequest, registry: RegistryDep, settings: SettingsDep) -> Job:
    return _job(req, registry, settings, "body")


async def query_job(
    req: Annotated[GenerateRequest, Query()], registry: RegistryDep, settings: SettingsDep
) -> Job:
    return _job(req, registry, settings, "query")


def _sse_encoder(job: Job) -> Callable[[Event], bytes]:
    def encode(event: Event) -> bytes:
        if isinstance(event, Token):  # one event per character
            return b"".join(
                sse("token", f'{{"index":{i},"text":{json.dumps(ch)}}}')
                for i, ch in enumerate(event.text, event.index)
            )
        if isinstance(event, Done):
            payload = _result(job, event)
            payload["usage"] = payload["usage"].model_dump()
            return sse("done", json.dumps(payload))
        return sse("error", StreamError(message=event.message, type=event.type).model_dump_json())

    return encode


def _sse_response(job: Job, request: Request) -> EventSourceResponse:
    """start, one token per character, then done (or error)."""
    close_when_cut_off(job, request)
    gen = job.gen
    start = sse(
        "start",
        json.dumps({"model": job.model.name, "seed": gen.seed, "prime_chars": len(gen.prime)}),
    )
    return EventSourceResponse(
        stream_events(job, _sse_encoder(job), head=start), headers=SSE_HEADERS
    )


_SSE_DOC = {
    200: {
        "description": "`start`, one `token` per character, then `done` (or `error`)",
        "content": {"text/event-stream": {}},
    },
    **_ERRORS,
}


@router.post("/generate/stream", response_model=None, responses=_SSE_DOC)
async def generate_stream(
    job: Annotated[Job, Depends(body_job)], request: Request
) -> EventSourceResponse:
    """Stream the generation as server-sent events (JSON body)."""
    return _sse_response(job, request)


@router.get("/generate/stream", response_model=None, responses=_SSE_DOC)
async def generate_stream_get(
    job: Annotated[Job, Depends(query_job)], request: Request
) -> EventSourceResponse:
    """Stream the generation as server-sent events (query parameters, for EventSource and
    `curl -N`; repeat `stop` for several stop strings)."""
    return _sse_response(job, request)
