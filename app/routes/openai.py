"""OpenAI-compatible ``/v1/models`` and ``/v1/completions`` (tokens are characters here).

Each prompt of a request is one generation (one choice, ``index`` in order), all submitted
through the request's ``Submitted``. ``echo`` prepends the prompt; with ``logprobs`` the
prompt is scored by its own prime pass (its first character has nothing before it: null),
and the generated characters carry the logprobs of the distributions they were drawn from."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse

from app import logprobs as lp
from app.admission import Submitted, resolve_model
from app.config import Settings
from app.deps import RegistryDep, SettingsDep, SubmittedDep
from app.engine import Generation
from app.errors import openai_error
from app.generation import Done, Event, Failed, Logprobs, Scored, TextRun
from app.registry import LoadedModel, Registry
from app.schemas import (
    UNSUPPORTED,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
    ModelCard,
    ModelList,
    OpenAIError,
)
from app.security import check_api_key
from app.streaming import PING_S, SSE_HEADERS, close_when_cut_off, sse, stream_events, wait_final
from app.validation import validate_generation

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(check_api_key)])

_ERRORS = {code: {"model": OpenAIError} for code in (400, 401, 404, 413, 429, 503)}


def _card(model: LoadedModel) -> ModelCard:
    return ModelCard(id=model.name, created=model.created)


@router.get("/models", response_model=ModelList, responses=_ERRORS)
async def list_models(registry: RegistryDep) -> ModelList:
    """The loaded models, in OpenAI's list shape."""
    return ModelList(data=[_card(m) for m in registry.models.values()])


@router.get("/models/{model_id}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model_id: str, registry: RegistryDep) -> ModelCard:
    """One loaded model (404 in OpenAI's error shape if unknown)."""
    if model_id not in registry.models:
        raise HTTPException(404, f"the model {model_id!r} does not exist")
    return _card(registry.models[model_id])


def _refuse_unsupported(req: CompletionRequest) -> None:
    for name, defaults in UNSUPPORTED.items():
        value = getattr(req, name)
        if not any(value == d and type(value) is not bool for d in defaults):
            raise HTTPException(
                400, f"{name}: not supported by this server; leave it unset or at its default"
            )


def _prompts(req: CompletionRequest, model: LoadedModel) -> list[str]:
    """The request's prompts as text: token ids are vocabulary positions."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise HTTPException(400, "prompt: must not be an empty list")
    if isinstance(prompt[0], str):
        return list(prompt)  # type: ignore[arg-type]
    lists = [prompt] if isinstance(prompt[0], int) else prompt
    vocab = model.backend.vocab
    out = []
    for ids in lists:
        assert isinstance(ids, list)
        bad = next((t for t in ids if not 0 <= t < len(vocab)), None)  # type: ignore[operator]
        if bad is not None:
            raise RequestValidationError(
                [
                    {
                        "type": "less_than",
                        "loc": ("body", "prompt"),
                        "msg": f"token id {bad} is out of range: ids are 0 to {len(vocab) - 1}",
                    }
                ]
            )
        out.append(vocab.decode(ids))  # type: ignore[arg-type]
    return out


def _submit(
    req: CompletionRequest, registry: Registry, settings: Settings, gens: Submitted
) -> tuple[LoadedModel, list[Generation]]:
    _refuse_unsupported(req)
    model = resolve_model(registry, req.model)
    prompts = _prompts(req, model)
    if any(not p for p in prompts):
        raise HTTPException(400, "prompt: must not be empty")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not 1 <= len(s) <= 64 for s in stop):
        raise HTTPException(400, "stop: at most 4 strings of 1 to 64 characters each")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise HTTPException(400, "max_tokens: 0 is valid only with echo (to score the prompt)")
    temperature = 1.0 if req.temperature is None else req.temperature
    top_k = req.top_k
    if temperature == 0:  # OpenAI's greedy decoding
        temperature, top_k = 1.0, 1
    requests = [
        validate_generation(
            model,
            settings,
            source="body",
            prime=prompt,
            max_new=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=stop,
            field_names={"prime": "prompt", "max_new": "max_tokens"},
            stream=req.stream,
            logprobs=req.logprobs,
            echo_scored=req.echo and req.logprobs is not None,
        )
        for prompt in prompts
    ]
    return model, [gens.submit(model, r, settings.stream_backlog) for r in requests]


def _usage(gens: list[Generation], completion_chars: int) -> CompletionUsage:
    prompt_chars = sum(len(g.request.prime) for g in gens)
    return CompletionUsage(
        prompt_tokens=prompt_chars,
        completion_tokens=completion_chars,
        total_tokens=prompt_chars + completion_chars,
    )


def _choice(index: int, gen: Generation, done: Done, req: CompletionRequest) -> CompletionChoice:
    prompt = gen.request.prime
    text = (prompt if req.echo else "") + done.generated_text
    logprobs = None
    if req.logprobs is not None:
        parts: list[Logprobs] = []
        if req.echo and done.prime is not None:
            parts.append(done.prime.logprobs)
        if done.logprobs is not None:
            parts.append(done.logprobs)
        logprobs = CompletionLogprobs(**lp.openai(parts))
    return CompletionChoice(
        index=index, text=text, finish_reason=done.finish_reason, logprobs=logprobs
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
    model, submitted = _submit(req, registry, settings, gens)
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        for gen in submitted:
            close_when_cut_off(gen, model.name, request)
        return _stream(model.name, submitted, req, cid, created, usage)
    choices = []
    for i, gen in enumerate(submitted):
        final = await wait_final(gen, request)
        if final is None:
            return Response(status_code=499)
        if not isinstance(final, Done):
            return openai_error(503 if final.type == "unavailable" else 500, final.message)
        choices.append(_choice(i, gen, final, req))
    generated = sum(len(c.text) for c in choices) - (
        sum(len(g.request.prime) for g in submitted) if req.echo else 0
    )
    return Completion(
        id=cid,
        created=created,
        model=model.name,
        choices=choices,
        usage=_usage(submitted, generated),
    )


class _Chunks:
    """The streamed ``data:`` chunks of one request: one per character per choice, an echoed
    prompt as one chunk, a last chunk per choice with its finish reason, then usage."""

    def __init__(
        self, name: str, gens: list[Generation], req: CompletionRequest, cid: str, created: int
    ):
        self.name, self.gens, self.req, self.cid, self.created = name, gens, req, cid, created
        self.generated = 0

    def chunk(self, choices: list[dict[str, Any]], usage: CompletionUsage | None = None) -> bytes:
        body = {
            "id": self.cid,
            "object": "text_completion",
            "created": self.created,
            "model": self.name,
            "choices": choices,
            "usage": usage.model_dump() if usage else None,
        }
        return sse(None, json.dumps(body))

    def head(self, i: int) -> bytes:
        """The echoed prompt, when it is not scored (a scored one comes as ``Scored``)."""
        if not self.req.echo or self.req.logprobs is not None:
            return b""
        prompt = self.gens[i].request.prime
        return self.chunk([{"index": i, "text": prompt, "finish_reason": None, "logprobs": None}])

    def encode(self, i: int, event: Event) -> bytes:
        offset = len(self.gens[i].request.prime) if self.req.echo else 0
        if isinstance(event, Scored):
            logprobs = lp.openai([event.logprobs])
            return self.chunk(
                [
                    {
                        "index": i,
                        "text": event.logprobs.tokens,
                        "finish_reason": None,
                        "logprobs": logprobs,
                    }
                ]
            )
        if isinstance(event, TextRun):  # one chunk per character
            out = []
            for k, ch in enumerate(event.text):
                logprobs = None
                if event.logprobs is not None:
                    top = event.top[k] if event.top is not None else {}
                    logprobs = {
                        "tokens": [ch],
                        "token_logprobs": [event.logprobs[k]],
                        "top_logprobs": [top if isinstance(top, dict) else dict(top)],
                        "text_offset": [offset + event.index + k],
                    }
                out.append(
                    self.chunk(
                        [{"index": i, "text": ch, "finish_reason": None, "logprobs": logprobs}]
                    )
                )
            return b"".join(out)
        if isinstance(event, Done):
            self.generated += len(event.generated_text)
            return self.chunk(
                [{"index": i, "text": "", "finish_reason": event.finish_reason, "logprobs": None}]
            )
        assert isinstance(event, Failed)
        error = {"message": event.message, "type": event.type, "param": None, "code": None}
        return sse(None, json.dumps({"error": error}))

    def usage(self) -> bytes:
        return self.chunk([], _usage(self.gens, self.generated))


def _stream(
    name: str,
    gens: list[Generation],
    req: CompletionRequest,
    cid: str,
    created: int,
    include_usage: bool,
) -> EventSourceResponse:
    """``data:`` chunks of text_completion objects, then [DONE]."""
    chunks = _Chunks(name, gens, req, cid, created)
    done = sse(None, "[DONE]")
    if len(gens) == 1:  # the common case: the single stream's coalesced writes

        def encode(event: Event) -> bytes:
            out = chunks.encode(0, event)
            if isinstance(event, Done) and include_usage:
                out += chunks.usage()
            return out

        body = stream_events(gens[0], encode, head=chunks.head(0), tail=done)
    else:
        body = _merged(chunks, include_usage, done)
    return EventSourceResponse(body, headers=SSE_HEADERS)


async def _merged(chunks: _Chunks, include_usage: bool, tail: bytes) -> AsyncIterator[bytes]:
    """Several choices' events as they come (each choice's in order)."""
    gens = chunks.gens
    head = b"".join(chunks.head(i) for i in range(len(gens)))
    if head:
        yield head
    waiting: dict[asyncio.Future[Event], int] = {
        asyncio.ensure_future(g.channel.get()): i for i, g in enumerate(gens)
    }
    failed = False
    try:
        while waiting:
            ready, _ = await asyncio.wait(
                waiting, timeout=PING_S, return_when=asyncio.FIRST_COMPLETED
            )
            if not ready:
                yield KEEPALIVE_COMMENT
                continue
            out = []
            for fut in ready:
                i = waiting.pop(fut)
                event = fut.result()
                out.append(chunks.encode(i, event))
                if isinstance(event, Failed):
                    failed = True
                elif not isinstance(event, Done):
                    waiting[asyncio.ensure_future(gens[i].channel.get())] = i
            yield b"".join(out)
            if failed:
                break
        if include_usage and not failed:
            yield chunks.usage()
        yield tail
    finally:
        for fut in waiting:
            fut.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fut
