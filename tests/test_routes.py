"""Route tests in-process: the ASGI app with its lifespan (models loaded, decode threads
running) driven through httpx's ASGI transport. No server process, no socket; what needs a
real socket (disconnects, a stalled reader, signals) is in the e2e tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse

from app.config import Settings
from app.main import create_app

Client = httpx.AsyncClient


@contextlib.asynccontextmanager
async def served(checkpoint: Path, **settings: object) -> AsyncIterator[Client]:
    """A client of the app, once its models are loaded and warmed up."""
    app = create_app(
        Settings(models=f"tiny={checkpoint}", shutdown_grace_s=0, **settings)  # type: ignore[arg-type]
    )
    async with app.router.lifespan_context(app):
        for _ in range(500):
            if app.state.engine.ready:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def run(checkpoint: Path, test: Callable[[Client], Awaitable[None]], **settings: object) -> None:
    async def main() -> None:
        async with served(checkpoint, **settings) as client:
            await test(client)

    asyncio.run(main())


async def _generate(c: Client, **body: object) -> dict:
    r = await c.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def _events(c: Client, method: str = "POST", **body: object) -> list[tuple[str, dict]]:
    kwargs = {"json": body} if method == "POST" else {"params": body}
    async with aconnect_sse(c, method, "/generate/stream", **kwargs) as es:
        assert es.response.status_code == 200
        assert es.response.headers["content-type"].startswith("text/event-stream")
        assert es.response.headers["cache-control"] == "no-cache"
        return [(sse.event, json.loads(sse.data)) async for sse in es.aiter_sse()]


def test_operations_routes(tiny_checkpoint):
    async def test(c: Client) -> None:
        assert (await c.get("/health")).json() == {"status": "ok"}
        ready = (await c.get("/ready")).json()
        assert ready["status"] == "ready" and ready["models"] == {"tiny": True}
        info = (await c.get("/info")).json()
        assert info["models"][0]["name"] == "tiny" and info["models"][0]["default"]
        assert info["limits"]["max_prime_chars"] == 4096
        assert "charrnn_requests_total" in (await c.get("/metrics")).text
        paths = (await c.get("/openapi.json")).json()["paths"]
        assert {"/generate", "/generate/stream", "/v1/completions", "/score"} <= set(paths)

    run(tiny_checkpoint, test)


def test_generate_and_both_streams_give_one_text(tiny_checkpoint):
    """The JSON answer, the POST stream and the GET stream of one request and seed: one
    ``start``, one ``token`` per character counting from 0, ``done`` with their text."""

    async def test(c: Client) -> None:
        body = {"prime": "Alice", "max_new_chars": 60, "seed": 7, "temperature": 0.8}
        whole = await _generate(c, **body)
        assert whole["finish_reason"] == "length" and len(whole["generated_text"]) == 60
        assert whole["usage"] == {"prime_chars": 5, "generated_chars": 60}
        assert (await _generate(c, **body))["generated_text"] == whole["generated_text"]
        for method in ("POST", "GET"):
            events = await _events(c, method, **body)
            start = {
                "model": "tiny",
                "checkpoint": whole["checkpoint"],
                "seed": 7,
                "prime_chars": 5,
            }
            assert events[0] == ("start", start)
            tokens = [data for kind, data in events if kind == "token"]
            assert [t["index"] for t in tokens] == list(range(60))
            kind, done = events[-1]
            assert kind == "done" and done["generated_text"] == whole["generated_text"]
            assert "".join(t["text"] for t in tokens) == whole["generated_text"]

    run(tiny_checkpoint, test)


def test_stop_strings_and_greedy_temperature_zero(tiny_checkpoint):
    async def test(c: Client) -> None:
        greedy = await _generate(c, prime="the ", max_new_chars=40, temperature=0, seed=1)
        top1 = await _generate(c, prime="the ", max_new_chars=40, top_k=1, seed=2)
        assert greedy["generated_text"] == top1["generated_text"]
        full = (await _generate(c, prime="the ", max_new_chars=200, seed=3))["generated_text"]
        stop = next(ch for ch in full[5:] if ch.strip())
        cut = await _generate(c, prime="the ", max_new_chars=200, seed=3, stop=[stop])
        assert cut["finish_reason"] == "stop"
        assert cut["generated_text"] == full[: full.index(stop)]
        events = await _events(c, "GET", prime="the ", max_new_chars=200, seed=3, stop=[stop])
        assert events[-1][1]["generated_text"] == cut["generated_text"]

    run(tiny_checkpoint, test)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"prime": ""}, "prime"),
        ({"max_new_chars": 0}, "max_new_chars"),
        ({"temperature": -1}, "temperature"),
        ({"top_k": 10_000}, "top_k"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_requests_are_422_naming_the_field_before_any_stream(tiny_checkpoint, patch, field):
    async def test(c: Client) -> None:
        for route in ("/generate", "/generate/stream"):
            r = await c.post(route, json={"prime": "Alice", **patch})
            assert r.status_code == 422 and r.headers["content-type"] == "application/json"
            assert field in [str(p) for e in r.json()["detail"] for p in e["loc"]]

    run(tiny_checkpoint, test)


def test_unknown_characters_and_models(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post("/generate", json={"prime": "Al\u2603ce"})
        msg = r.json()["detail"][0]["msg"]
        assert r.status_code == 422 and "'\u2603' at position 2" in msg
        r = await c.post("/generate", json={"prime": "Alice", "model": "nope"})
        assert r.status_code == 404 and "nope" in r.json()["detail"]
        r = await c.post("/v1/completions", json={"prompt": "Al\u2603ce"})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "prompt"
        assert error["message"].startswith("prompt: prompt has characters not in the")
        r = await c.post("/v1/completions", json={"prompt": "Alice", "model": "gpt-4"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    run(tiny_checkpoint, test)


def test_chat_completions_names_the_completions_route(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert r.status_code == 404
        error = r.json()["error"]
        assert "/v1/completions" in error["message"] and error["code"] != "model_not_found"

    run(tiny_checkpoint, test)


def test_openai_sdk_in_process(tiny_checkpoint):
    async def test(c: Client) -> None:
        client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="-", http_client=c)
        plain = await client.completions.create(
            model="tiny", prompt="Alice", max_tokens=30, seed=4, temperature=0.9
        )
        text = plain.choices[0].text
        assert len(text) == 30 and plain.usage.completion_tokens == 30
        chunks = [
            chunk
            async for chunk in await client.completions.create(
                model="tiny",
                prompt="Alice",
                max_tokens=30,
                seed=4,
                temperature=0.9,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
        assert chunks[-1].usage.completion_tokens == 30
        greedy = await client.completions.create(
            model="tiny", prompt="the ", max_tokens=20, temperature=0
        )
        native = await _generate(c, prime="the ", max_new_chars=20, top_k=1)
        assert greedy.choices[0].text == native["generated_text"]

    run(tiny_checkpoint, test)


def test_score_and_tokenizer_routes(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post("/score", json={"text": "the cat", "context": "Alice ", "top_logprobs": 2})
        body = r.json()
        assert r.status_code == 200 and body["chars"] == 7 and body["scored_chars"] == 7
        assert len(body["logprobs"]["top_logprobs"][0]) == 2
        ids = (await c.post("/tokenize", json={"prompt": "tea"})).json()["tokens"]
        assert (await c.post("/detokenize", json={"tokens": ids})).json() == {"prompt": "tea"}
        assert (await c.post("/detokenize", json={"tokens": [10_000]})).status_code == 422

    run(tiny_checkpoint, test)


def test_429_when_the_batch_and_queue_are_full(tiny_checkpoint):
    """Admission counts the generations someone waits for: the third of a batch of one and
    a queue of one is refused before any work, with Retry-After."""

    async def test(c: Client) -> None:
        long = {"prime": "Alice", "max_new_chars": 100_000, "seed": 1}
        held = [asyncio.ensure_future(c.post("/generate", json=long)) for _ in range(2)]
        await asyncio.sleep(0.2)
        r = await c.post("/generate", json={"prime": "Alice"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        for task in held:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*held)

    run(
        tiny_checkpoint,
        test,
        max_concurrent=1,
        max_queue=1,
        max_new_chars_limit=100_000,
    )
