"""Native generation: ``POST /generate`` (JSON) and ``POST|GET /generate/stream`` (SSE)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse

from app import logprobs
from app.admission import Submitted, resolve_model
from app.config import Settings
from app.deps import RegistryDep, SettingsDep, SubmittedDep
from app.engine import Generation
from app.generation import Done, Event, Failed, TextRun
from app.registry import LoadedModel, Registry
from app.schemas import GenerateRequest, GenerateResponse, StreamError, Usage
from app.security import check_api_key
from app.streaming import SSE_HEADERS, close_when_cut_off, sse, stream_events, wait_final
from app.validation import validate_generation

router = APIRouter(tags=["generation"], dependencies=[Depends(check_api_key)])

_ERRORS = {
    401: {"description": "API keys are configured and none valid was sent"},
    404: {"description": "unknown model"},
    413: {"description": "request body too large"},
    422: {"description": "invalid parameters, e.g. prime characters outside the vocabulary"},
    429: {"description": "the batch and the queue are full; see Retry-After"},
    503: {"description": "not ready yet, or shutting down"},
}


def _submit(
    req: GenerateRequest,
    registry: Registry,
    settings: Settings,
    gens: Submitted,
    source: str,
    stream: bool = True,
) -> tuple[LoadedModel, Generation]:
    model = resolve_model(registry, req.model)
    request = validate_generation(
        model,
        settings,
        source=source,
        prime=req.prime,
        max_new=req.max_new_chars,
        temperature=req.temperature,
        top_k=req.top_k,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stop,
        stream=stream,
        logprobs=req.logprobs,
    )
    return model, gens.submit(model, request, settings.stream_backlog)


def _result(gen: Generation, done: Done, with_logprobs: bool = True) -> dict:
    extra = {}
    if with_logprobs and done.logprobs is not None:
        extra["logprobs"] = logprobs.native(done.logprobs)
    return {
        **extra,
        "generated_text": done.generated_text,
        "finish_reason": done.finish_reason,
        "seed": gen.request.sampling.seed,
        "usage": Usage(
            prime_chars=len(gen.request.prime), generated_chars=len(done.generated_text)
        ),
        "timings": gen.timings.as_dict(len(done.generated_text)),
    }


@router.post(
    "/generate",
    response_model=GenerateResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
async def generate(
    req: GenerateRequest,
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    gens: SubmittedDep,
) -> GenerateResponse | Response:
    """Generate text after a prime and return it whole."""
    model, gen = _submit(req, registry, settings, gens, "body", stream=False)
    final = await wait_final(gen, request)
    if final is None:  # the client left; nobody reads this
        return Response(status_code=499)
    if isinstance(final, Failed):
        status = 503 if final.type == "unavailable" else 500
        return Response(
            json.dumps({"detail": final.message}), status_code=status, media_type="application/json"
        )
    return GenerateResponse(model=model.name, prime=gen.request.prime, **_result(gen, final))


Submission = tuple[LoadedModel, Generation]


async def body_submission(
    req: GenerateRequest, registry: RegistryDep, settings: SettingsDep, gens: SubmittedDep
) -> Submission:
    return _submit(req, registry, settings, gens, "body")


async def query_submission(
    req: Annotated[GenerateRequest, Query()],
    registry: RegistryDep,
    settings: SettingsDep,
    gens: SubmittedDep,
) -> Submission:
    return _submit(req, registry, settings, gens, "query")


def _sse_encoder(gen: Generation) -> Callable[[Event], bytes]:
    def encode(event: Event) -> bytes:
        if isinstance(event, TextRun):  # one event per character
            if event.logprobs is not None:
                tops = event.top if event.top is not None else [None] * len(event.text)
                return b"".join(
                    sse("token", logprobs.token_event(i, ch, p, top))
                    for i, ch, p, top in zip(
                        range(event.index, event.index + len(event.text)),
                        event.text,
                        event.logprobs,
                        tops,
                        strict=True,
                    )
                )
            return b"".join(
                sse("token", f'{{"index":{i},"text":{json.dumps(ch)}}}')
                for i, ch in enumerate(event.text, event.index)
            )
        if isinstance(event, Done):
            payload = _result(gen, event, with_logprobs=False)  # the token events had them
            payload["usage"] = payload["usage"].model_dump()
            return sse("done", json.dumps(payload))
        if isinstance(event, Failed):
            error = StreamError(message=event.message, type=event.type)
            return sse("error", error.model_dump_json())
        return b""  # a Scored prime: native generation does not ask for one

    return encode


def _sse_response(submission: Submission, request: Request) -> EventSourceResponse:
    """start, one token per character, then done (or error)."""
    model, gen = submission
    close_when_cut_off(gen, model.name, request)
    start = {
        "model": model.name,
        "seed": gen.request.sampling.seed,
        "prime_chars": len(gen.request.prime),
    }
    return EventSourceResponse(
        stream_events(gen, _sse_encoder(gen), head=sse("start", json.dumps(start))),
        headers=SSE_HEADERS,
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
    submission: Annotated[Submission, Depends(body_submission)], request: Request
) -> EventSourceResponse:
    """Stream the generation as server-sent events (JSON body)."""
    return _sse_response(submission, request)


@router.get("/generate/stream", response_model=None, responses=_SSE_DOC)
async def generate_stream_get(
    submission: Annotated[Submission, Depends(query_submission)], request: Request
) -> EventSourceResponse:
    """Stream the generation as server-sent events (query parameters, for EventSource and
    `curl -N`; repeat `stop` for several stop strings)."""
    return _sse_response(submission, request)
