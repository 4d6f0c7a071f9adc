"""The native protocol's adapter: a ``GenerateRequest`` into the engine's request, and the
engine's events into the native JSON response and server-sent events."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from app.api import constraints, logprobs
from app.api.sse import NATIVE_TOKENS, CharEvents, Encode, HandleStream, Tail, pump, sse
from app.api.validation import (
    fit_prime,
    input_report,
    samples,
    validate_generation,
    validate_samples_and_controls,
)
from app.config import Settings
from app.engine import Done, Event, Failed, GenerationRequest, Handle, LoadedModel, TextRun
from app.schemas import GenerateRequest, GenerateResponse, StreamError, Usage


@dataclass(frozen=True)
class Asked:
    """What a request asks for: the samples to draw (one, or ``best_of``/``n``), how many
    to return, whether best first, and whether the client wants logprobs."""

    requests: list[GenerationRequest]
    n: int = 1
    ranked: bool = False
    logprobs: bool = False
    input: dict[str, Any] | None = None  # what unknown_chars did to the prime

    @property
    def many(self) -> bool:
        return len(self.requests) > 1 or self.n > 1


async def to_requests(
    req: GenerateRequest, model: LoadedModel, settings: Settings, source: str, stream: bool
) -> Asked:
    """The engine's requests (one per sample), or a 422 naming every problem (``source``:
    body or query); a constraint is compiled after the other fields pass."""
    fitted = fit_prime(model, settings, req.prime, req.unknown_chars, (source, "prime"))
    if fitted is not None:
        req = req.model_copy(update={"prime": fitted.text})
    request = _validated(req, model, settings, source, stream)
    drawn, controls = validate_samples_and_controls(
        model, settings, req, source=source, stream=stream, request=request
    )
    constraint = await constraints.compile_for(
        model, settings, req.constraint, (source, "constraint")
    )
    request = dataclasses.replace(request, constraint=constraint, controls=controls)
    ranked, asked_logprobs = req.best_of is not None, req.logprobs is not None
    return Asked(samples(request, drawn), req.n, ranked, asked_logprobs, input_report(fitted))


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
        "checkpoint": handle.checkpoint,
        "generated_text": done.generated_text,
        "finish_reason": done.finish_reason,
        "seed": request.sampling.seed,
        "usage": Usage(prime_chars=len(request.prime), generated_chars=len(done.generated_text)),
        "timings": handle.timings.as_dict(len(done.generated_text)),
    }


def response(
    model: LoadedModel, asked: Asked, handles: list[Handle], dones: list[Done]
) -> GenerateResponse:
    """The JSON answer: one sample's fields at the top, and with n > 1 every sample."""
    order = _ranked(asked, dones)
    first = order[0]
    out = _result(handles[first], dones[first], asked.logprobs)
    if asked.many:
        out["samples"] = [
            _sample(k, handles[i], dones[i], asked.logprobs) for k, i in enumerate(order)
        ]
        out["usage"] = _usage(handles[first].request, dones)
    if asked.input is not None:
        out["input"] = asked.input
    return GenerateResponse(model=model.name, prime=handles[first].request.prime, **out)


def _ranked(asked: Asked, dones: list[Done]) -> list[int]:
    """The samples returned, by index: the n with the best score, best first (``best_of``),
    else all in order."""
    if not asked.ranked:
        return list(range(len(dones)))
    return logprobs.best_first(dones)[: asked.n]


def _sample(index: int, handle: Handle, done: Done, with_logprobs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": index,
        "generated_text": done.generated_text,
        "finish_reason": done.finish_reason,
        "seed": handle.request.sampling.seed,
        "score": done.score,
    }
    if with_logprobs and done.logprobs is not None:
        out["logprobs"] = logprobs.native(done.logprobs)
    if done.matched is not None:
        out["constraint"] = {"matched": done.matched}
    return out


def _usage(request: GenerationRequest, dones: list[Done]) -> Usage:
    """Every sample drawn counts, as OpenAI counts ``best_of``'s."""
    generated = sum(len(d.generated_text) for d in dones)
    return Usage(prime_chars=len(request.prime), generated_chars=generated)


def _encoder(asked: Asked, handles: list[Handle]) -> tuple[Encode, Tail]:
    """The stream's events; with n > 1 each token names its sample, and one ``done`` with
    every sample closes the stream."""
    many = asked.many
    dones: dict[int, Done] = {}
    tokens = [
        CharEvents('event: token\ndata: {"index":', f',"sample":{i},"text":', "}\n\n")
        if many
        else NATIVE_TOKENS
        for i in range(len(handles))
    ]

    def encode(i: int, event: Event) -> bytes:
        if isinstance(event, TextRun):  # one event per character
            if event.logprobs is None or not asked.logprobs:
                return tokens[i].run(event.index, event.text)
            tops = event.top if event.top is not None else [None] * len(event.text)
            sample = i if many else None
            return b"".join(
                sse("token", logprobs.token_event(k, ch, p, top, sample))
                for k, ch, p, top in zip(
                    range(event.index, event.index + len(event.text)),
                    event.text,
                    event.logprobs,
                    tops,
                    strict=True,
                )
            )
        if isinstance(event, Done):
            if many:
                dones[i] = event
                return b""
            payload = _result(handles[i], event, with_logprobs=False)  # the tokens had them
            payload["usage"] = payload["usage"].model_dump()
            return sse("done", json.dumps(payload))
        if isinstance(event, Failed):
            return sse(
                "error", StreamError(message=event.message, type=event.type).model_dump_json()
            )
        return b""  # a Scored prime: native generation does not ask for one

    def tail(failed: bool) -> bytes:
        if not many or failed or len(dones) < len(handles):
            return b""
        done = [dones[i] for i in range(len(handles))]
        return sse("done", json.dumps(response_fields(asked, handles, done)))

    return encode, tail


def response_fields(asked: Asked, handles: list[Handle], dones: list[Done]) -> dict[str, Any]:
    """The ``done`` event of several samples: the JSON answer's fields, without the
    logprobs (the token events carried them)."""
    order = _ranked(asked, dones)
    out = _result(handles[order[0]], dones[order[0]], False)
    out["usage"] = _usage(handles[order[0]].request, dones).model_dump()
    out["samples"] = [_sample(k, handles[i], dones[i], False) for k, i in enumerate(order)]
    return out


def stream(model: LoadedModel, asked: Asked, handles: list[Handle]) -> HandleStream:
    """``start``, one ``token`` per character, then ``done`` (or ``error``)."""
    request = handles[0].request
    start = {
        "model": model.name,
        "checkpoint": handles[0].checkpoint,
        "seed": request.sampling.seed,
        "prime_chars": len(request.prime),
    }
    if asked.many:
        start["n"] = len(handles)
    if asked.input is not None:
        start["input"] = asked.input
    head = sse("start", json.dumps(start))
    encode, tail = _encoder(asked, handles)
    return HandleStream(handles, pump(handles, encode, head=head, tail=tail))
