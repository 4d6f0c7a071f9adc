"""Crowds of requests that mix every per-row option, and what each one must answer.

A ``Case`` is one client's request: a route (JSON, either SSE route, OpenAI completions,
streamed or not, ``/score``) and a body drawn at random from every per-row option (logprobs
none/0/n, a constraint, stop strings, greedy, top-k, top-p, seeds, cached, short and chunked
primes, OpenAI echo with logprobs, many samples with ``n`` and ``best_of``, the generation
controls), or a client that gives up part-way. ``perform`` runs a
case on a client (in-process or over a socket) and returns what it answered, without the
parts that may differ from run to run (timings, ids): the same case must answer the same
alone and in any crowd. The route tests (tests/test_crowd.py) run crowds in-process with the
tiny model and on a real server with the shipped one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import aconnect_sse

ROUTES = ("json", "sse", "sse_get", "openai", "openai_stream", "score")
# Fields that say when or under which id a request ran, not what it answered.
VOLATILE = frozenset({"timings", "id", "created", "system_fingerprint"})


@dataclass(frozen=True)
class Case:
    route: str
    body: dict[str, Any]
    # A client that gives up this many seconds after sending (None: it reads to the end).
    give_up_s: float | None = None
    labels: tuple[str, ...] = field(default=(), compare=False)


@dataclass
class Texts:
    """What a crowd's primes are drawn from: ``text`` in the model's vocabulary, and the
    constraints its vocabulary can meet; ``guard``: the model has a text index (the copy
    guard may be drawn)."""

    text: str
    regexes: tuple[str, ...]
    choices: tuple[tuple[str, ...], ...]
    model: str | None = None
    guard: bool = False


def random_case(rng: random.Random, texts: Texts, max_new: int = 120) -> Case:
    """One request with options drawn at random; ``labels`` names the options drawn."""
    route = rng.choice(ROUTES)
    labels = [route]
    prime = _prime(rng, texts.text, labels)
    if route == "score":
        cut = rng.randint(0, len(prime) - 1)
        body: dict[str, Any] = {"text": prime[cut:], "context": prime[:cut]}
        body["top_logprobs"] = rng.choice((0, 0, 3))
        return Case(route, _model(body, texts), labels=tuple(labels))
    body = {"seed": rng.randrange(2**40)}
    temperature = rng.choice((0.0, 0.7, 1.0, 1.3))
    body["temperature"] = temperature
    labels.append("greedy" if temperature == 0 else "sampled")
    if rng.random() < 0.4:
        body["top_k"] = rng.randint(1, 12)
        labels.append("top_k")
    if rng.random() < 0.4:
        body["top_p"] = rng.choice((0.5, 0.8, 0.95))
        labels.append("top_p")
    if rng.random() < 0.3:
        body["stop"] = rng.sample(["e ", "th", ".", "\n", "an"], rng.randint(1, 2))
        labels.append("stop")
    logprobs = rng.choice((None, None, 0, 2, 5))
    if logprobs is not None:
        body["logprobs"] = logprobs
        labels.append(f"logprobs={logprobs}")
    new = rng.choice((1, rng.randint(2, 30), max_new))
    if route.startswith("openai"):
        body |= {"prompt": prime, "max_tokens": new}
        if rng.random() < 0.3:
            body["echo"] = True
            labels.append("echo")
            if rng.random() < 0.3:
                body["max_tokens"] = 0
        if route == "openai_stream":
            body["stream"] = True
        if rng.random() < 0.2:
            body["structured_outputs"] = {"regex": rng.choice(texts.regexes)}
            labels.append("constraint")
    else:
        body |= {"prime": prime, "max_new_chars": new}
        if rng.random() < 0.25:
            body["constraint"] = _constraint(rng, texts)
            labels.append("constraint")
    if rng.random() < 0.3:  # generation controls
        body |= _controls(rng)
        labels.append("controls")
    if texts.guard and rng.random() < 0.3:  # the copy guard
        guards: list[dict[str, Any]] = [{"max_copy_chars": rng.choice((4, 8, 12))}]
        if all(s.startswith("\n") for s in body.get("stop", ())):
            guards += [{"novel_lines": True}, {"max_copy_chars": 6, "novel_lines": True}]
        body |= rng.choice(guards)
        labels.append("copy guard")
    if route != "sse_get" and rng.random() < 0.15:  # many samples from one prime
        body["n"] = rng.randint(2, 3)
        labels.append("n")
        if route in ("json", "openai") and rng.random() < 0.5:
            body["best_of"] = body["n"] + rng.randint(0, 2)
            labels.append("best_of")
    give_up = None
    if route in ("json", "sse", "openai_stream") and rng.random() < 0.2:
        give_up = rng.choice((0.0, 0.005, 0.02))
        labels.append("gives up")
    return Case(route, _model(body, texts), give_up, tuple(labels))


def _controls(rng: random.Random) -> dict[str, Any]:
    """A few generation controls drawn at random (the OpenAI route takes them too)."""
    pool: list[dict[str, Any]] = [
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.4, "penalty_last_n": 16},
        {"repetition_penalty": 1.3},
        {"dry_multiplier": 0.8, "dry_allowed_length": 3},
        {"banned_strings": ["the", "e "]},
        {"min_p": 0.1},
        {"typical_p": 0.9},
    ]
    out: dict[str, Any] = {}
    for extra in rng.sample(pool, rng.randint(1, 3)):
        out |= extra
    return out


def _prime(rng: random.Random, text: str, labels: list[str]) -> str:
    kind = rng.choice(("cached", "cached", "short", "medium", "chunked"))
    labels.append(f"prime:{kind}")
    if kind == "cached":  # a few primes that many requests share
        start, n = rng.choice(((0, 5), (0, 40), (100, 12)))
    else:
        # A chunked prime is longer than one iteration's prime budget (512 positions).
        low, high = {"short": (1, 3), "medium": (4, 200), "chunked": (600, 1500)}[kind]
        n = rng.randint(low, high)
        start = rng.randrange(len(text) - n)
    return text[start : start + n]


def _constraint(rng: random.Random, texts: Texts) -> dict[str, Any]:
    if rng.random() < 0.6:
        return {"regex": rng.choice(texts.regexes)}
    return {"choice": list(rng.choice(texts.choices))}


def _model(body: dict[str, Any], texts: Texts) -> dict[str, Any]:
    return body | ({"model": texts.model} if texts.model else {})


async def perform(client: httpx.AsyncClient, case: Case) -> Any:
    """What ``case`` answers on ``client`` (None for a client that gave up)."""
    work = _ROUTES[case.route](client, case.body)
    if case.give_up_s is None:
        return await work
    task = asyncio.ensure_future(work)
    await asyncio.sleep(case.give_up_s)
    if task.done():
        task.result()  # a failure before the client gave up is still a failure
        return None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def _stable(value: Any) -> Any:
    """``value`` without its volatile fields, at any depth."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


async def _json(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Any:
    r = await client.post(path, json=body)
    assert r.status_code == 200, (path, body, r.status_code, r.text[:500])
    return _stable(r.json())


async def _generate(client: httpx.AsyncClient, body: dict[str, Any]) -> Any:
    return await _json(client, "/generate", body)


async def _score(client: httpx.AsyncClient, body: dict[str, Any]) -> Any:
    return await _json(client, "/score", body)


async def _openai(client: httpx.AsyncClient, body: dict[str, Any]) -> Any:
    return await _json(client, "/v1/completions", body)


async def _sse(client: httpx.AsyncClient, body: dict[str, Any], method: str = "POST") -> Any:
    kwargs: dict[str, Any]
    if method == "GET":
        query = {k: v for k, v in body.items() if k not in ("stop", "constraint")}
        query["stop"] = body.get("stop", [])
        if "constraint" in body:
            query["constraint"] = json.dumps(body["constraint"])
        kwargs = {"params": query}
    else:
        kwargs = {"json": body}
    async with aconnect_sse(client, method, "/generate/stream", **kwargs) as es:
        assert es.response.status_code == 200, (body, await es.response.aread())
        events = [(e.event, _stable(json.loads(e.data))) async for e in es.aiter_sse()]
    assert events and events[-1][0] == "done", (body, events[-3:])
    if body.get("n", 1) == 1:
        text = "".join(data["text"] for name, data in events if name == "token")
        assert text == events[-1][1]["generated_text"], body
    # Each sample's events in order; how the samples interleave depends on timing.
    return sorted(events, key=lambda e: (e[0] != "start", e[0] == "done", e[1].get("sample", 0)))


async def _sse_get(client: httpx.AsyncClient, body: dict[str, Any]) -> Any:
    return await _sse(client, body, "GET")


async def _openai_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> Any:
    chunks = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, (body, await r.aread())
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks and chunks[-1] == "[DONE]", (body, chunks[-3:])
    parsed = [_stable(json.loads(c)) for c in chunks[:-1]]
    # Each choice's chunks in order; how the choices interleave depends on timing.
    return sorted(parsed, key=lambda c: [ch["index"] for ch in c.get("choices", [])] or [1e9])


_ROUTES = {
    "json": _generate,
    "sse": _sse,
    "sse_get": _sse_get,
    "openai": _openai,
    "openai_stream": _openai_stream,
    "score": _score,
}


async def crowd_and_alone(
    client: httpx.AsyncClient, cases: list[Case]
) -> list[tuple[Case, Any, Any]]:
    """Each case's answer in a crowd of all of them at once, then alone, in order."""
    crowd = await asyncio.gather(*(perform(client, c) for c in cases))
    out = []
    for case, together in zip(cases, crowd, strict=True):
        if case.give_up_s is not None:
            continue
        out.append((case, together, await perform(client, case)))
    return out
