"""Request validation that needs the model: vocabulary, model-dependent and configured limits.

Pydantic checks each field's own rules; this layer checks the rest against the model and the
settings and turns a valid request into the engine's ``GenerationRequest``. Every problem is
reported at once, in FastAPI's 422 shape (the OpenAI routes answer it as their 400)."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError

from app.config import Settings
from app.engine import GenerationRequest, LoadedModel
from app.schemas import ControlInfo, SamplesAndControls
from charrnn.controls import Controls
from charrnn.lookalikes import Fitted, Mode, fit
from charrnn.sampling import MAX_SEED, SamplingParams
from charrnn.structured import Grammar


def _error(loc: tuple[str, ...], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"type": kind, "loc": loc, "msg": msg}


def describe_unknown(
    unknown: list[tuple[str, int]], what: str = "prime", fixable: bool = False
) -> str:
    """``fixable``: the request may ask the server to replace or drop them."""
    listed = ", ".join(f"{ch!r} at position {pos}" for ch, pos in unknown)
    hint = ', or send "unknown_chars": "replace" (or "drop")' if fixable else ""
    return (
        f"{what} has characters not in the model's vocabulary: {listed}; "
        f"remove or replace them (GET /info lists the vocabulary){hint}"
    )


def _top_n_error(loc: tuple[str, ...], n: int | None, vocab_size: int) -> list[dict[str, Any]]:
    if n is None or n <= vocab_size:
        return []
    msg = f"at most the vocabulary size ({vocab_size}) alternatives per character"
    return [_error(loc, msg, "less_than_equal")]


def validate_score(
    model: LoadedModel, settings: Settings, *, text: str, context: str, top_logprobs: int
) -> GenerationRequest:
    """``POST /score`` as a scored prime (``context + text``, scored from the text on) that
    never generates, or a 422 naming every problem."""
    vocab = model.vocab
    errors: list[dict[str, Any]] = []
    if len(text) > settings.max_score_chars:
        msg = (
            f"text is {len(text)} characters; at most {settings.max_score_chars} are allowed "
            "(score a longer text in parts, passing the end of one part as the next context)"
        )
        errors.append(_error(("body", "text"), msg, "string_too_long"))
    elif unknown := vocab.unknown(text):
        errors.append(
            _error(("body", "text"), describe_unknown(unknown, "text"), "unknown_characters")
        )
    if len(context) > settings.max_prime_chars:
        msg = (
            f"context is {len(context)} characters; at most {settings.max_prime_chars} are allowed"
        )
        errors.append(_error(("body", "context"), msg, "string_too_long"))
    elif unknown := vocab.unknown(context):
        errors.append(
            _error(("body", "context"), describe_unknown(unknown, "context"), "unknown_characters")
        )
    errors += _top_n_error(("body", "top_logprobs"), top_logprobs, len(vocab))
    if errors:
        raise RequestValidationError(errors)
    return GenerationRequest(
        context + text,
        0,
        SamplingParams(seed=0),
        stream=False,
        score_from=len(context),
        score_top=top_logprobs,
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
    logprobs: int | None = None,
    echo_scored: bool = False,
    constraint: Grammar | None = None,
) -> GenerationRequest:
    """The generation a request asks ``model`` for, or a 422 naming every problem.
    ``echo_scored``: the prime is scored too (OpenAI's ``echo`` with ``logprobs``);
    ``constraint``: compiled already (app/api/constraints.py)."""
    names = {
        "prime": "prime",
        "max_new": "max_new_chars",
        "top_k": "top_k",
        "logprobs": "logprobs",
        **(field_names or {}),
    }
    vocab = model.vocab
    errors: list[dict[str, Any]] = []
    if len(prime) > settings.max_prime_chars:
        errors.append(
            _error(
                (source, names["prime"]),
                f"{names['prime']} is {len(prime)} characters; at most "
                f"{settings.max_prime_chars} are allowed",
                "string_too_long",
            )
        )
    elif unknown := vocab.unknown(prime):
        errors.append(
            _error(
                (source, names["prime"]),
                describe_unknown(unknown, names["prime"], fixable=True),
                "unknown_characters",
            )
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
    errors += _top_n_error((source, names["logprobs"]), logprobs, len(vocab))
    if errors:
        raise RequestValidationError(errors)
    if temperature == 0:  # greedy: the likeliest character, the same text as top_k 1
        temperature, top_k = 1.0, 1
    sampling = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed if seed is not None else secrets.randbelow(MAX_SEED),
    )
    return GenerationRequest(
        prime,
        max_new,
        sampling,
        tuple(stop),
        stream,
        logprobs,
        score_from=0 if echo_scored else None,
        score_top=(logprobs or 0) if echo_scored else 0,
        constraint=constraint,
    )


def validate_samples_and_controls(
    model: LoadedModel,
    settings: Settings,
    fields: SamplesAndControls,
    *,
    source: str,
    stream: bool,
    request: GenerationRequest,
    token_ids: bool = False,
) -> tuple[int, Controls]:
    """How many samples to draw (``best_of``, else ``n``) and the generation controls, or a
    422 naming every problem. ``token_ids``: ``logit_bias`` keys are token ids (OpenAI's),
    else characters. ``request``: the validated generation (its length and stop strings)."""
    errors: list[dict[str, Any]] = _copy_guard_errors(model, fields, source, request.stop)
    n, best_of = fields.n, fields.best_of
    if n > settings.max_n:
        errors.append(_error((source, "n"), f"at most {settings.max_n} samples (max_n)"))
    if best_of is not None:
        if best_of < n:
            errors.append(_error((source, "best_of"), f"best_of must be at least n ({n})"))
        elif best_of > settings.max_n:
            errors.append(_error((source, "best_of"), f"at most {settings.max_n} (max_n)"))
        if stream:
            msg = "best_of cannot be streamed: the best samples are known only at the end"
            errors.append(_error((source, "best_of"), msg))
    drawn = best_of or n
    if drawn > settings.max_concurrent:
        field = "best_of" if best_of else "n"
        msg = (
            f"{drawn} samples can never run at once: the server runs at most "
            f"{settings.max_concurrent} generations together (max_concurrent)"
        )
        errors.append(_error((source, field), msg))
    bias, bias_errors = _logit_bias(model, fields.logit_bias or {}, source, token_ids)
    errors += bias_errors
    if errors:
        raise RequestValidationError(errors)
    controls = Controls(
        logit_bias=bias,
        repetition_penalty=fields.repetition_penalty,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        penalty_last_n=fields.penalty_last_n,
        dry_multiplier=fields.dry_multiplier,
        dry_base=fields.dry_base,
        dry_allowed_length=fields.dry_allowed_length,
        dry_sequence_breakers=tuple(fields.dry_sequence_breakers),
        dry_penalty_last_n=fields.dry_penalty_last_n,
        banned_strings=tuple(fields.banned_strings),
        min_p=fields.min_p,
        typical_p=fields.typical_p,
        max_copy_chars=fields.max_copy_chars,
        novel_lines=fields.novel_lines,
        length=request.max_new if fields.novel_lines else 0,
    )
    return drawn, controls


def _copy_guard_errors(
    model: LoadedModel, fields: SamplesAndControls, source: str, stop: Sequence[str]
) -> list[dict[str, Any]]:
    """The copy guard needs the model's training text index; and with ``novel_lines`` a stop
    string must begin with a newline: one that cuts a line short could leave a training line
    as the text's last."""
    errors = []
    asked = [f for f in ("max_copy_chars", "novel_lines") if getattr(fields, f)]
    if asked and not model.has_text_index:
        for f in asked:
            msg = (
                f"{f} needs the model's training text index, and model {model.name!r} has "
                "none (GET /info: text_index; `python -m training index` builds one)"
            )
            errors.append(_error((source, f), msg))
    cutting = [s for s in stop if not s.startswith("\n")]
    if fields.novel_lines and cutting:
        msg = (
            f"with novel_lines a stop string must begin with a newline, not {cutting[0]!r}: "
            "one that cuts a line short could leave a training line as the last"
        )
        errors.append(_error((source, "stop"), msg))
    return errors


def _logit_bias(
    model: LoadedModel, bias: dict[str, float], source: str, token_ids: bool
) -> tuple[tuple[tuple[int, float], ...], list[dict[str, Any]]]:
    """``logit_bias`` as (id, value) pairs in id order, and the problems with its keys."""
    vocab = model.vocab
    loc = (source, "logit_bias")
    if len(bias) > len(vocab):
        return (), [_error(loc, f"at most {len(vocab)} entries (the vocabulary size)")]
    out: dict[int, float] = {}
    errors = []
    for key, value in bias.items():
        if not -100 <= value <= 100:
            errors.append(_error((*loc, key), f"{value} is outside -100 to 100"))
            continue
        if token_ids:
            i = int(key) if key.isdigit() else -1
            if not 0 <= i < len(vocab):
                msg = f"key {key!r} is not a token id: ids are 0 to {len(vocab) - 1}"
                errors.append(_error((*loc, key), msg))
                continue
        else:
            if len(key) != 1 or key not in vocab:
                msg = (
                    f"key {key!r} is not one character of the model's vocabulary "
                    "(GET /info lists it)"
                )
                errors.append(_error((*loc, key), msg))
                continue
            i = vocab.encode(key)[0]
        out[i] = value
    return tuple(sorted(out.items())), errors


def samples(request: GenerationRequest, drawn: int) -> list[GenerationRequest]:
    """The ``drawn`` samples of a request: sample i seeded with seed + i, each exactly the
    single request with that seed. With several, each gets its logprobs (its score is their
    mean); the adapters drop them where the client did not ask."""
    if drawn == 1:
        return [request]
    seed = request.sampling.seed
    logprobs = 0 if request.logprobs is None else request.logprobs
    return [
        dataclasses.replace(
            request,
            sampling=dataclasses.replace(request.sampling, seed=(seed + i) % MAX_SEED),
            logprobs=logprobs,
        )
        for i in range(drawn)
    ]


def controls_info(settings: Settings) -> list[ControlInfo]:
    """The generation controls and sample counts with their defaults and bounds, read from
    the request schema itself (so /info cannot drift from what is validated)."""
    out = []
    for name, field in SamplesAndControls.model_fields.items():
        info = ControlInfo(
            name=name,
            default=field.get_default(call_default_factory=True),
            description=field.description,
        )
        for rule in field.metadata:
            for attr, (key, exclusive) in _BOUNDS.items():
                value = getattr(rule, attr, None)
                if value is not None:
                    setattr(info, key, value)
                    if exclusive:
                        setattr(info, f"exclusive_{key}", True)
            if getattr(rule, "max_length", None) is not None:
                info.max_items = rule.max_length
        out.append(info)
    for info in out:
        if info.name in ("n", "best_of"):
            info.maximum = settings.max_n
    return out


_BOUNDS = {"ge": ("minimum", False), "gt": ("minimum", True), "le": ("maximum", False)}
_BOUNDS |= {"lt": ("maximum", True)}


def fit_prime(
    model: LoadedModel, settings: Settings, prime: str, mode: Mode | None, loc: tuple[str, ...]
) -> Fitted | None:
    """``prime`` fitted to the vocabulary by ``mode`` (None: the server's setting); None
    where the mode is "error" (unknown characters are then refused with the prime's other
    checks). A prime left empty is a 422."""
    mode = mode or settings.unknown_chars
    if mode == "error":
        return None
    fitted = fit(prime, model.vocab, mode)
    if not fitted.text:
        msg = (
            f"{loc[-1]} has no character the model's vocabulary can write once unknown ones "
            f"are {'replaced or ' if mode == 'replace' else ''}dropped; GET /info lists it"
        )
        raise RequestValidationError([_error(loc, msg, "unknown_characters")])
    return fitted


def input_report(fitted: Fitted | None) -> dict[str, Any] | None:
    if fitted is None:
        return None
    return {
        "replaced": [list(r) for r in fitted.replaced],
        "dropped": [list(d) for d in fitted.dropped],
    }
