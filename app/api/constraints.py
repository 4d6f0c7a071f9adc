"""A request's constraint, checked and compiled in its validation step (never on the decode
thread): the contract's object for the native routes, and OpenAI's ``response_format`` and
vLLM's ``structured_outputs`` for ``/v1/completions``, each into one ``Constraint``.

A compile runs on charrnn.structured's worker threads within ``constraint_compile_s``; the
event loop awaits it without blocking, and a constraint compiled before comes from the cache
without a thread. Every failure is a validation error naming the field and what to fix."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi.exceptions import RequestValidationError

from app.config import Settings
from app.engine import LoadedModel
from app.schemas import ConstraintLimits
from charrnn import structured
from charrnn.structured import Constraint, ConstraintError, Grammar, cached, compile_constraint

# OpenAI's response_format types, and vLLM's structured_outputs keys as the contract's kinds.
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
STRUCTURED_OUTPUTS = {
    "regex": "regex",
    "choice": "choice",
    "json": "json_schema",
    "grammar": "grammar",
}


def limits(settings: Settings) -> ConstraintLimits:
    """The kinds and limits /info lists."""
    return ConstraintLimits(
        kinds=list(structured.KINDS),
        max_regex_chars=structured.MAX_REGEX_CHARS,
        max_choices=structured.MAX_CHOICES,
        max_schema_bytes=structured.MAX_SCHEMA_BYTES,
        max_schema_depth=structured.MAX_SCHEMA_DEPTH,
        max_grammar_bytes=structured.MAX_GRAMMAR_BYTES,
        compile_s=settings.constraint_compile_s,
    )


def _refuse(loc: tuple[str, ...], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "constraint", "loc": loc, "msg": msg}])


async def compile_for(
    model: LoadedModel,
    settings: Settings,
    spec: Any,
    loc: tuple[str, ...],
    located: bool = False,
) -> Grammar | None:
    """``spec`` (the contract's object; None: no constraint) compiled for ``model``, or a
    validation error at ``loc``. ``located``: the messages drop their "constraint.kind"
    subject, as the OpenAI errors name the field ``loc`` before them."""
    if spec is None:
        return None
    try:
        constraint = Constraint.parse(spec)
        vocab = model.vocab
        grammar = cached(vocab, constraint)
        if grammar is None:
            timeout = settings.constraint_compile_s
            grammar = await asyncio.to_thread(compile_constraint, vocab, constraint, timeout)
    except ConstraintError as exc:
        raise _refuse(loc, _unsubjected(str(exc)) if located else str(exc)) from None
    return grammar


def _unsubjected(msg: str) -> str:
    """ "constraint.regex does not compile: …" -> "does not compile: …"."""
    head, _, rest = msg.partition(" ")
    return rest if head.startswith("constraint.") else msg


def openai_spec(
    response_format: Any, structured_outputs: Any
) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """The contract's object for a completions request's ``response_format`` and
    ``structured_outputs`` (at most one of them; None: neither), and where to report its
    errors."""
    fmt = None if response_format in (None, {"type": "text"}) else response_format
    if fmt is not None and structured_outputs is not None:
        raise _refuse(
            ("body", "structured_outputs"),
            "give response_format or structured_outputs, not both",
        )
    if fmt is not None:
        return _response_format(fmt)
    if structured_outputs is not None:
        return _structured_outputs(structured_outputs)
    return None, ()


def _response_format(fmt: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    loc = ("body", "response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise _refuse(loc, f"type must be one of {', '.join(RESPONSE_FORMATS)}")
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}, loc
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise _refuse(
            (*loc, "json_schema"),
            'must be an object with "schema", a JSON schema object (and "name", "strict")',
        )
    return {"json_schema": spec["schema"]}, (*loc, "json_schema", "schema")


def _structured_outputs(value: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    loc = ("body", "structured_outputs")
    given = [k for k in STRUCTURED_OUTPUTS if isinstance(value, dict) and value.get(k) is not None]
    if not isinstance(value, dict) or len(given) != 1:
        got = f"{', '.join(given) or 'none'}" if isinstance(value, dict) else type(value).__name__
        raise _refuse(loc, f"give exactly one of {', '.join(STRUCTURED_OUTPUTS)}; got {got}")
    (key,) = given
    spec = value[key]
    if key == "json" and isinstance(spec, str):  # vLLM takes the schema as JSON text too
        try:
            spec = json.loads(spec)
        except ValueError as exc:
            raise _refuse((*loc, key), f"is not JSON: {exc}") from None
    return {STRUCTURED_OUTPUTS[key]: spec}, (*loc, key)
