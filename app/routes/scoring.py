"""Probabilities of a given text: ``POST /score``, and the tokenizer routes in vLLM's shapes
(``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``) that evaluation tools
use to count and split characters as the model does."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse

from app.api import scoring
from app.api.deps import EngineDep, SettingsDep
from app.api.security import check_api_key
from app.api.sse import disconnected
from app.api.validation import validate_score
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
    body = scoring.score_body(model, req.text, done)
    return StreamingResponse(body, media_type="application/json")


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(
    req: TokenizeRequest, engine: EngineDep, settings: SettingsDep
) -> TokenizeResponse:
    """The prompt's character ids (vocabulary positions; there are no special tokens)."""
    return scoring.tokenize(engine.model(req.model), req.prompt, settings.max_prime_chars)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(req: DetokenizeRequest, engine: EngineDep) -> DetokenizeResponse:
    """The text of character ids."""
    return scoring.detokenize(engine.model(req.model), req.tokens)


@router.get("/tokenizer_info", responses=_ERRORS)
async def tokenizer_info(
    engine: EngineDep, settings: SettingsDep, model: str | None = None
) -> dict[str, Any]:
    """The tokenizer: one token per character of the vocabulary. A character model has no
    special tokens; the newline stands in for the end of a text."""
    return scoring.tokenizer_info(engine.model(model), settings.max_prime_chars)
