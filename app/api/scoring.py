"""The scoring protocol's adapter: a ``/score`` answer written in pieces, and the tokenizer
routes' answers (vLLM's shapes), from a loaded model's vocabulary."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.exceptions import RequestValidationError

from app.api import logprobs
from app.api.validation import describe_unknown
from app.engine import Done, LoadedModel, Logprobs
from app.schemas import DetokenizeResponse, TokenizeResponse

# Entries encoded per piece of a /score response: a few milliseconds of the event loop.
PIECE = 4096


def score_body(model: LoadedModel, text: str, done: Done) -> AsyncIterator[bytes]:
    """The ``/score`` response of a finished scoring request, as pieces of JSON."""
    assert done.prime_scores is not None  # a scored prime's final event carries its scores
    scored = done.prime_scores.logprobs
    head: dict[str, Any] = {
        "model": model.name,
        "chars": len(text),
        **logprobs.summary(scored.token_logprobs),
    }
    return _body(head, scored)


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


def tokenize(model: LoadedModel, prompt: str, max_model_len: int) -> TokenizeResponse:
    """The prompt's character ids, or a 422 naming the characters outside the vocabulary."""
    vocab = model.vocab
    if unknown := vocab.unknown(prompt):
        raise RequestValidationError(
            [
                {
                    "type": "unknown_characters",
                    "loc": ("body", "prompt"),
                    "msg": describe_unknown(unknown, "prompt"),
                }
            ]
        )
    ids = vocab.encode(prompt)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=max_model_len)


def detokenize(model: LoadedModel, tokens: list[int]) -> DetokenizeResponse:
    """The text of character ids, or a 422 naming the ids out of range."""
    vocab = model.vocab
    bad = [
        {
            "type": "less_than",
            "loc": ("body", "tokens", i),
            "msg": f"token id {t} is out of range: ids are 0 to {len(vocab) - 1}",
        }
        for i, t in enumerate(tokens)
        if not 0 <= t < len(vocab)
    ]
    if bad:
        raise RequestValidationError(bad[:10])
    return DetokenizeResponse(prompt=vocab.decode(tokens))


def tokenizer_info(model: LoadedModel, max_model_len: int) -> dict[str, Any]:
    """One token per character of the vocabulary. A character model has no special tokens;
    the newline stands in for the end of a text."""
    vocab = model.vocab
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
        "model_max_length": max_model_len,
        "max_model_len": max_model_len,
    }
