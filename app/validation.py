"""Request validation that needs the model: vocabulary, model-dependent and configured limits.

Pydantic checks each field's own rules; this layer checks the rest against the model and the
settings and turns a valid request into a ``GenerationRequest``. Every problem is reported at
once, in FastAPI's 422 shape."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi.exceptions import RequestValidationError

from app.config import Settings
from app.generation import GenerationRequest
from app.registry import LoadedModel
from charrnn.sampling import MAX_SEED, SamplingParams


def _error(loc: tuple[str, ...], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg}


def describe_unknown(unknown: list[tuple[str, int]]) -> str:
    listed = ", ".join(f"{ch!r} at position {pos}" for ch, pos in unknown)
    return (
        f"prime has characters not in the model's vocabulary: {listed}; "
        "remove or replace them (GET /info lists the vocabulary)"
    )


def validate_generation(
    model: LoadedModel,
    settings: Settings,
    *,
    source: str,
    prime: str,
    max_new: int,
    temperature: float,
    top_k: int | None,
    top_p: float,
    seed: int | None,
    stop: list[str],
    field_names: dict[str, str] | None = None,
    stream: bool = True,
) -> GenerationRequest:
    """The generation a request asks ``model`` for, or a 422 naming every problem."""
    names = {"prime": "prime", "max_new": "max_new_chars", "top_k": "top_k", **(field_names or {})}
    vocab = model.backend.vocab
    errors: list[dict[str, Any]] = []
    if len(prime) > settings.max_prime_chars:
        errors.append(
            _error(
                (source, names["prime"]),
                f"prime is {len(prime)} characters; at most {settings.max_prime_chars} are allowed",
                "string_too_long",
            )
        )
    elif unknown := vocab.unknown(prime):
        errors.append(
            _error((source, names["prime"]), describe_unknown(unknown), "unknown_characters")
        )
    if max_new > settings.max_new_chars_limit:
        errors.append(
            _error(
                (source, names["max_new"]),
                f"at most {settings.max_new_chars_limit} new characters per request",
                "less_than_equal",
            )
        )
    if top_k is not None and top_k > len(vocab):
        errors.append(
            _error(
                (source, names["top_k"]),
                f"top_k must be at most the vocabulary size ({len(vocab)})",
                "less_than_equal",
            )
        )
    if errors:
        raise RequestValidationError(errors)
    sampling = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed if seed is not None else secrets.randbelow(MAX_SEED),
    )
    return GenerationRequest(prime, max_new, sampling, tuple(stop), stream)
