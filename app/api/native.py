"""The native protocol's adapter: a ``GenerateRequest`` into the engine's request, and the
engine's events into the native JSON response and server-sent events."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from app.api import constraints, logprobs
from app.api.sse import NATIVE_TOKENS, Encode, HandleStream, pump, sse
from app.api.validation import validate_generation
from app.config import Settings
from app.engine import Done, Event, Failed, GenerationRequest, Handle, LoadedModel, TextRun
from app.schemas import GenerateRequest, GenerateResponse, StreamError, Usage


async def to_request(
    req: GenerateRequest, model: LoadedModel, settings: Settings, source: str, stream: bool
) -> GenerationRequest:
    """The engine's request, or a 422 naming every problem (``source``: body or query); a
    constraint is compiled after the other fields pass."""
    request = _validated(req, model, settings, source, stream)
    constraint = await constraints.compile_for(
        model, settings, req.constraint, (source, "constraint")
    )
    return dataclasses.replace(request, constraint=constraint) if constraint else request


def _validated(
    req: GenerateRequest, model: LoadedModel, settings: Settings, source: str, stream: bool
) -> GenerationRequest:
    return validate_generation(
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


def _result(handle: Handle, done: Done, with_logprobs: bool) -> dict[str, Any]:
    """The fields the JSON response and the ``done`` event share."""
    extra: dict[str, Any] = {}
    if with_logprobs and done.logprobs is not None:
        extra["logprobs"] = logprobs.native(done.logprobs)
    if done.matched is not None:
        extra["constraint"] = {"matched": done.matched}
    request = handle.request
    return {
        **extra,
        "generated_text": done.generated_text,
        "finish_reason": done.finish_reason,
        "seed": request.sampling.seed,
        "usage": Usage(prime_chars=len(request.prime), generated_chars=len(done.generated_text)),
        "timings": handle.timings.as_dict(len(done.generated_text)),
    }


def response(model: LoadedModel, handle: Handle, done: Done) -> GenerateResponse:
    return GenerateResponse(
        model=model.name, prime=handle.request.prime, **_result(handle, done, True)
    )


def _encoder(handle: Handle) -> Encode:
    def encode(_: int, event: Event) -> bytes:
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
            return NATIVE_TOKENS.run(event.index, event.text)
        if isinstance(event, Done):
            payload = _result(handle, event, with_logprobs=False)  # the token events had them
            payload["usage"] = payload["usage"].model_dump()
            return sse("done", json.dumps(payload))
        if isinstance(event, Failed):
            return sse(
                "error", StreamError(message=event.message, type=event.type).model_dump_json()
            )
        return b""  # a Scored prime: native generation does not ask for one

    return encode


def stream(model: LoadedModel, handle: Handle) -> HandleStream:
    """``start``, one ``token`` per character, then ``done`` (or ``error``)."""
    request = handle.request
    start = {"model": model.name, "seed": request.sampling.seed, "prime_chars": len(request.prime)}
    head = sse("start", json.dumps(start))
    return HandleStream([handle], pump([handle], _encoder(handle), head=head))
