"""The OpenAI completions adapter (tokens are characters here): a ``CompletionRequest`` into
one engine request per prompt, OpenAI's 400 rules on the way, and the engine's events into
``text_completion`` objects and ``data:`` chunks.

``echo`` prepends the prompt; with ``logprobs`` the prompt is scored by its own prime pass
(its first character has nothing before it: null), and the generated characters carry the
logprobs of the distributions they were drawn from."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from app.api import constraints
from app.api import logprobs as lp
from app.api.sse import CharEvents, HandleStream, pump, sse
from app.api.validation import (
    fit_prime,
    input_report,
    samples,
    validate_generation,
    validate_samples_and_controls,
)
from app.config import Settings
from app.engine import (
    Done,
    Event,
    Failed,
    GenerationRequest,
    Handle,
    LoadedModel,
    Logprobs,
    Scored,
    TextRun,
)
from app.schemas import (
    UNSUPPORTED,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionUsage,
)

DONE = sse(None, "[DONE]")


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
    vocab = model.vocab
    out = []
    for ids in lists:
        assert isinstance(ids, list)
        bad = next((t for t in ids if not 0 <= t < len(vocab)), None)  # type: ignore[operator]
        if bad is not None:
            msg = f"token id {bad} is out of range: ids are 0 to {len(vocab) - 1}"
            raise RequestValidationError(
                [{"type": "less_than", "loc": ("body", "prompt"), "msg": msg}]
            )
        out.append(vocab.decode(ids))  # type: ignore[arg-type]
    return out


async def to_requests(
    req: CompletionRequest, model: LoadedModel, settings: Settings
) -> tuple[list[GenerationRequest], int, list[dict[str, Any]] | None]:
    """The engine's requests, ``best_of`` (else ``n``) samples per prompt, prompt after
    prompt; how many per prompt; and what ``unknown_chars`` did to each prompt (None in
    "error" mode). Or a 400 naming the field. ``response_format`` or ``structured_outputs``
    is compiled once, after the other fields pass, for them all."""
    requests, inputs = _validated(req, model, settings)
    drawn, controls = validate_samples_and_controls(
        model, settings, req, source="body", stream=req.stream, request=requests[0], token_ids=True
    )
    spec, loc = constraints.openai_spec(req.response_format, req.structured_outputs)
    grammar = await constraints.compile_for(model, settings, spec, loc, located=True)
    requests = [dataclasses.replace(r, constraint=grammar, controls=controls) for r in requests]
    return [s for r in requests for s in samples(r, drawn)], drawn, inputs


def _validated(
    req: CompletionRequest, model: LoadedModel, settings: Settings
) -> tuple[list[GenerationRequest], list[dict[str, Any]] | None]:
    _refuse_unsupported(req)
    prompts = _prompts(req, model)
    if any(not p for p in prompts):
        raise HTTPException(400, "prompt: must not be empty")
    loc = ("body", "prompt")
    fitted = [fit_prime(model, settings, p, req.unknown_chars, loc) for p in prompts]
    prompts = [f.text if f is not None else p for f, p in zip(fitted, prompts, strict=True)]
    reports = [r for f in fitted if (r := input_report(f)) is not None] or None
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not 1 <= len(s) <= 64 for s in stop):
        raise HTTPException(400, "stop: at most 4 strings of 1 to 64 characters each")
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise HTTPException(400, "max_tokens: 0 is valid only with echo (to score the prompt)")
    return [
        validate_generation(
            model,
            settings,
            source="body",
            prime=prompt,
            max_new=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=stop,
            field_names={"prime": "prompt", "max_new": "max_tokens"},
            stream=req.stream,
            logprobs=req.logprobs,
            echo_scored=req.echo and req.logprobs is not None,
        )
        for prompt in prompts
    ], reports


def _usage(handles: list[Handle], drawn: int, completion_chars: int) -> CompletionUsage:
    """Each prompt counts once, every sample drawn (``best_of``'s too) counts."""
    prompt_chars = sum(len(h.request.prime) for h in handles[::drawn])
    return CompletionUsage(
        prompt_tokens=prompt_chars,
        completion_tokens=completion_chars,
        total_tokens=prompt_chars + completion_chars,
    )


def _choice(index: int, handle: Handle, done: Done, req: CompletionRequest) -> CompletionChoice:
    prompt = handle.request.prime
    text = (prompt if req.echo else "") + done.generated_text
    logprobs = None
    if req.logprobs is not None:
        parts: list[Logprobs] = []
        if req.echo and done.prime_scores is not None:
            parts.append(done.prime_scores.logprobs)
        if done.logprobs is not None:
            parts.append(done.logprobs)
        logprobs = CompletionLogprobs(**lp.openai(parts))
    return CompletionChoice(
        index=index, text=text, finish_reason=done.finish_reason, logprobs=logprobs
    )


def completion(
    name: str,
    cid: str,
    created: int,
    handles: list[Handle],
    dones: list[Done],
    req: CompletionRequest,
    drawn: int = 1,
    inputs: list[dict[str, Any]] | None = None,
) -> Completion:
    """``n`` choices per prompt (``index`` = prompt × n + sample): with ``best_of``, the n
    samples with the best mean logprob per character, best first."""
    choices = []
    for start in range(0, len(handles), drawn):
        group = list(range(start, start + drawn))
        if req.best_of is not None:
            group = [start + i for i in lp.best_first(dones[start : start + drawn])]
        for i in group[: req.n]:
            choices.append(_choice(len(choices), handles[i], dones[i], req))
    generated = sum(len(d.generated_text) for d in dones)
    usage = _usage(handles, drawn, generated)
    return Completion(
        id=cid,
        created=created,
        model=name,
        choices=choices,
        usage=usage,
        input=inputs,
        checkpoint=handles[0].checkpoint,
    )


class _Chunks:
    """The streamed ``data:`` chunks of one request: one per character per choice, an echoed
    prompt as one chunk, a last chunk per choice with its finish reason, then usage."""

    def __init__(
        self, name: str, handles: list[Handle], req: CompletionRequest, cid: str, created: int
    ):
        self.name, self.handles, self.req, self.cid, self.created = name, handles, req, cid, created
        self.generated = 0
        self._chars: dict[int, CharEvents] = {}  # per choice: its chunks without logprobs

    def chunk(self, choices: list[dict[str, Any]], usage: CompletionUsage | None = None) -> bytes:
        return sse(None, self._body(choices, usage))

    def _body(self, choices: list[dict[str, Any]], usage: CompletionUsage | None = None) -> str:
        body = {
            "id": self.cid,
            "object": "text_completion",
            "created": self.created,
            "model": self.name,
            "choices": choices,
            "usage": usage.model_dump() if usage else None,
        }
        return json.dumps(body)

    def _char_events(self, i: int) -> CharEvents:
        """Choice ``i``'s one-character chunks, cut once around the character's place."""
        events = self._chars.get(i)
        if events is None:
            mark = json.dumps("\0")
            choice = {"index": i, "text": "\0", "finish_reason": None, "logprobs": None}
            before, after = self._body([choice]).split(mark)
            events = self._chars[i] = CharEvents(f"data: {before}", "", f"{after}\n\n", False)
        return events

    def _text(self, i: int, text: str, logprobs: Any = None, finish: str | None = None) -> bytes:
        return self.chunk(
            [{"index": i, "text": text, "finish_reason": finish, "logprobs": logprobs}]
        )

    def head(self) -> bytes:
        """The echoed prompts, when they are not scored (a scored one comes as ``Scored``)."""
        if not self.req.echo or self.req.logprobs is not None:
            return b""
        return b"".join(self._text(i, h.request.prime) for i, h in enumerate(self.handles))

    def encode(self, i: int, event: Event) -> bytes:
        if isinstance(event, Scored):
            return self._text(i, event.logprobs.tokens, lp.openai([event.logprobs]))
        if isinstance(event, TextRun):  # one chunk per character
            if event.logprobs is None or self.req.logprobs is None:
                return self._char_events(i).run(event.index, event.text)
            offset = (len(self.handles[i].request.prime) if self.req.echo else 0) + event.index
            out = []
            for k, ch in enumerate(event.text):
                top = [event.top[k]] if event.top is not None else None
                logprobs = lp.openai([Logprobs(ch, [event.logprobs[k]], top)], offset + k)
                out.append(self._text(i, ch, logprobs))
            return b"".join(out)
        if isinstance(event, Done):
            self.generated += len(event.generated_text)
            return self._text(i, "", finish=event.finish_reason)
        assert isinstance(event, Failed)
        error = {"message": event.message, "type": event.type, "param": None, "code": None}
        return sse(None, json.dumps({"error": error}))

    def tail(self, include_usage: bool) -> bytes:
        usage = b""
        if include_usage:
            usage = self.chunk([], _usage(self.handles, self.req.n, self.generated))
        return usage + DONE


def stream(
    name: str, handles: list[Handle], req: CompletionRequest, cid: str, created: int
) -> HandleStream:
    """``data:`` chunks of text_completion objects, then usage when asked for, then [DONE]."""
    chunks = _Chunks(name, handles, req, cid, created)
    usage = bool(req.stream_options and req.stream_options.include_usage)
    body = pump(
        handles,
        chunks.encode,
        head=chunks.head(),
        tail=lambda failed: chunks.tail(usage and not failed),
    )
    return HandleStream(handles, body)
