"""The service on a real uvicorn server on a loopback port (e2e): each route family once over
a real socket, and what only a socket shows (a client hanging up mid-stream).

Everything else about the routes is tested in-process, without a socket: the native and
operations routes, keys, limits, request ids and metrics in tests/test_routes.py, OpenAI's in
tests/test_openai_routes.py, scoring and the tokenizer in tests/test_scoring.py."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse, connect_sse

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.server(max_new_chars_limit=1_000_000),
]


# -- each route family over a socket -------------------------------------------------------


def test_operations_routes_over_a_socket(server):
    health = {"route": "/health", "status": "200"}
    before = server.metric("charrnn_requests_total", **health)
    r = httpx.get(f"{server.url}/health", headers={"X-Request-ID": "smoke-1"})
    assert r.json() == {"status": "ok"} and r.headers["x-request-id"] == "smoke-1"
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"
    assert [m["name"] for m in httpx.get(f"{server.url}/info").json()["models"]] == ["tiny"]
    assert httpx.get(f"{server.url}/metrics").headers["content-type"].startswith("text/plain")
    assert server.metric("charrnn_requests_total", **health) == before + 1
    assert "id=smoke-1" in server.log()  # the access log, on the server's output


def test_native_routes_over_a_socket(server):
    """The JSON answer and both streams of one request, their SSE framing as a proxy sees
    it."""
    body = {"prime": "Alice was", "max_new_chars": 40, "seed": 7}
    r = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    whole = r.json()["generated_text"]
    assert len(whole) == 40
    for method in ("POST", "GET"):
        kwargs = {"json": body} if method == "POST" else {"params": body}
        with (
            httpx.Client(timeout=60) as c,
            connect_sse(c, method, f"{server.url}/generate/stream", **kwargs) as es,
        ):
            assert es.response.status_code == 200
            assert es.response.headers["content-type"].startswith("text/event-stream")
            assert es.response.headers["cache-control"] == "no-cache"
            assert es.response.headers["x-accel-buffering"] == "no"
            got = [(sse.event, json.loads(sse.data)) for sse in es.iter_sse()]
        assert [kind for kind, _ in got] == ["start"] + ["token"] * 40 + ["done"]
        assert "".join(d["text"] for kind, d in got if kind == "token") == whole
        assert got[-1][1]["generated_text"] == whole


def test_openai_sdk_over_a_socket(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    body = {"prime": "Alice", "max_new_chars": 30, "seed": 5, "top_k": 6}
    native = httpx.post(f"{server.url}/generate", json=body, timeout=60).json()
    request = {
        "model": "tiny",
        "prompt": "Alice",
        "max_tokens": 30,
        "seed": 5,
        "extra_body": {"top_k": 6},
    }
    assert client.completions.create(**request).choices[0].text == native["generated_text"]
    chunks = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == native["generated_text"]
    assert chunks[-1].usage.completion_tokens == 30


def test_scoring_routes_over_a_socket(server, vocab):
    r = httpx.post(f"{server.url}/score", json={"text": "the cat", "context": "Alice "})
    assert r.status_code == 200 and r.json()["scored_chars"] == 7
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": "tea"}).json()["tokens"]
    assert ids == vocab.encode("tea")
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids})
    assert r.json() == {"prompt": "tea"}
    assert httpx.get(f"{server.url}/tokenizer_info").json()["vocab_size"] == len(vocab)


# -- what only a socket shows --------------------------------------------------------------


def test_disconnect_frees_its_row(server):
    """A client that hangs up mid-stream stops its generation (of a million characters)
    within a decode call or two: its row is freed and nothing decodes for it any more."""
    generated = lambda: server.metric("charrnn_generated_characters_total", model="tiny")  # noqa: E731
    cutoffs = lambda: server.metric("charrnn_slow_client_cutoffs_total", model="tiny")  # noqa: E731
    before, cut_before = generated(), cutoffs()

    async def run() -> None:
        async with (
            httpx.AsyncClient(timeout=60) as c,
            aconnect_sse(
                c,
                "POST",
                f"{server.url}/generate/stream",
                json={"prime": "Alice", "max_new_chars": 1_000_000, "seed": 1},
            ) as es,
        ):
            n = 0
            async for sse in es.aiter_sse():
                n += sse.event == "token"
                if n == 20:
                    break
            assert server.metric("charrnn_active_generations", model="tiny") == 1

    asyncio.run(run())
    for _ in range(100):
        if server.metric("charrnn_active_generations", model="tiny") == 0:
            break
        time.sleep(0.05)
    assert server.metric("charrnn_active_generations", model="tiny") == 0
    stopped_at = generated()
    time.sleep(0.3)
    assert generated() == stopped_at  # nothing decodes for the client that left
    assert stopped_at - before < 1_000_000  # stopped long before its end
    # ... by the client leaving, not by the backlog of a reader that stopped reading.
    assert cutoffs() == cut_before
