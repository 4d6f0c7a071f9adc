"""Probabilities of a given text: ``POST /score``, and the tokenizer routes in vLLM's shapes
(``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``) that evaluation tools
use to count and split characters as the model does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse

from app.api import logprobs
from app.api.deps import EngineDep, SettingsDep
from app.api.security import check_api_key
from app.api.sse import disconnected
from app.api.validation import describe_unknown, validate_score
from app.engine import Logprobs
from app.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    ScoreRequest,
    ScoreResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(tags=["scoring"], dependencies=[Depends(check_api_key)])

_ERRORS = {
    401: {"description": "API keys are configured and none valid was sent"},
    404: {"description": "unknown model"},
    413: {"description": "request body too large"},
    422: {"description": "invalid parameters, e.g. characters outside the vocabulary"},
    429: {"description": "the batch and the queue are full; see Retry-After"},
    503: {"description": "not ready yet, or shutting down"},
}


@router.post("/score", response_model=ScoreResponse, responses=_ERRORS)
async def score(
    req: ScoreRequest, request: Request, engine: EngineDep, settings: SettingsDep
) -> Response:
    """Each character's log-probability given everything before it (the context, then the
    earlier characters of the text), with the mean NLL, bits per character and perplexity.
    Runs as a prime warm-up through the scheduler, in parts between the running streams."""
    model = engine.model(req.model)
    job = validate_score(
        model, settings, text=req.text, context=req.context, top_logprobs=req.top_logprobs
    )
    done = await engine.submit(model, job).result(disconnected(request))
    if done is None:
        return Response(status_code=499)
    assert done.prime_scores is not None  # a scored prime's final event carries its scores
    scored = done.prime_scores.logprobs
    head: dict[str, Any] = {
        "model": model.name,
        "chars": len(req.text),
        **logprobs.summary(scored.token_logprobs),
    }
    return StreamingResponse(_body(head, scored), media_type="application/json")


# Entries encoded per piece of a /score response: a few milliseconds of the event loop.
PIECE = 4096


async def _body(head: dict[str, Any], scored: Logprobs) -> AsyncIterator[bytes]:
    """The response, written in pieces with the event loop let go between them: one
    ``json.dumps`` of 100,000 characters' logprobs would hold it (and every stream) for a
    tenth of a second. Built by hand for the same reason, not by a pydantic model."""
    n = len(scored.tokens)
    top = scored.top
    columns: list[tuple[str, Callable[[int, int], list[Any]]]] = [
        ("text_offset", lambda i, j: list(range(i, j))),
        ("tokens", lambda i, j: list(scored.tokens[i:j])),
        ("token_logprobs", lambda i, j: scored.token_logprobs[i:j]),
        (
            "top_logprobs",
            lambda i, j: [
                None if lp is None else (logprobs.native_top(top[k]) if top else [])
                for k, lp in zip(range(i, j), scored.token_logprobs[i:j], strict=True)
            ],
        ),
    ]
    yield (json.dumps(head, separators=(",", ":"))[:-1] + ',"logprobs":{').encode()
    for c, (name, rows) in enumerate(columns):
        parts = [f'{"," if c else ""}"{name}":[']
        for i in range(0, n, PIECE):
            piece = json.dumps(rows(i, min(n, i + PIECE)), separators=(",", ":"))[1:-1]
            parts.append(("," if i else "") + piece)
            yield "".join(parts).encode()
            parts = []
            await asyncio.sleep(0)
        yield ("".join(parts) + "]").encode()
    yield b"}}"


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(
    req: TokenizeRequest, engine: EngineDep, settings: SettingsDep
) -> TokenizeResponse:
    """The prompt's character ids (vocabulary positions; there are no special tokens)."""
    vocab = engine.model(req.model).runner.vocab
    if unknown := vocab.unknown(req.prompt):
        raise RequestValidationError(
            [
                {
                    "type": "unknown_characters",
                    "loc": ("body", "prompt"),
                    "msg": describe_unknown(unknown, "prompt"),
                }
            ]
        )
    ids = vocab.encode(req.prompt)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=settings.max_prime_chars)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(req: DetokenizeRequest, engine: EngineDep) -> DetokenizeResponse:
    """The text of character ids."""
    vocab = engine.model(req.model).runner.vocab
    bad = [
        {
            "type": "less_than",
            "loc": ("body", "tokens", i),
            "msg": f"token id {t} is out of range: ids are 0 to {len(vocab) - 1}",
        }
        for i, t in enumerate(req.tokens)
        if not 0 <= t < len(vocab)
    ]
    if bad:
        raise RequestValidationError(bad[:10])
    return DetokenizeResponse(prompt=vocab.decode(req.tokens))


@router.get("/tokenizer_info", responses=_ERRORS)
async def tokenizer_info(
    engine: EngineDep, settings: SettingsDep, model: str | None = None
) -> dict[str, Any]:
    """The tokenizer: one token per character of the vocabulary. A character model has no
    special tokens; the newline stands in for the end of a text."""
    vocab = engine.model(model).runner.vocab
    eos = "\n" if "\n" in vocab else None
    return {
        "tokenizer_class": "CharacterTokenizer",
        "vocab_size": len(vocab),
        "vocab": {ch: i for i, ch in enumerate(vocab.chars)},
        "eos_token": eos,
        "eos_token_id": vocab.encode(eos)[0] if eos else None,
        "bos_token": None,
        "pad_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": settings.max_prime_chars,
        "max_model_len": settings.max_prime_chars,
    }
