"""End-to-end tests of the HTTP contract against a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse

from charrnn import load_checkpoint, native
from tests.server import run_server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    with run_server(
        tmp_path_factory.mktemp("srv"),
        f"tiny={tiny_checkpoint}",
        max_prime_chars=300,
        max_new_chars_limit=1_000_000,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def vocab(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint).vocab


def generate(server, **body) -> dict:
    r = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server, method="POST", **body) -> tuple[list[tuple[str, dict]], httpx.Response]:
    events = []
    kwargs = {"json": body} if method == "POST" else {"params": body}
    with (
        httpx.Client(timeout=60) as c,
        connect_sse(c, method, f"{server.url}/generate/stream", **kwargs) as es,
    ):
        assert es.response.status_code == 200
        for sse in es.iter_sse():
            events.append((sse.event, json.loads(sse.data)))
        return events, es.response


# -- operations ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_health_ready_info(server, vocab):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = {"status": "ready", "models": {"tiny": True}, "failing": {}}
    assert httpx.get(f"{server.url}/ready").json() == ready
    info = httpx.get(f"{server.url}/info").json()
    (m,) = info["models"]
    assert m["name"] == "tiny" and m["default"] is True
    assert m["vocabulary"] == vocab.chars
    assert m["architecture"] == {
        "cell": "lstm",
        "layers": 2,
        "hidden": 32,
        "embed": 8,
        "vocab_size": len(vocab),
    }
    assert m["parameters"] > 0 and m["device"] == "cpu" and m["dtype"] == "float32"
    assert m["decode_weights"] == "int8"
    # The native int8 kernels wherever this process could build or load them.
    assert m["decode_kernels"] == ("native" if native.load() else "eager")
    assert m["batch_invariant"] is True and "exact" in m["decode_reason"]
    assert m["metrics"]["best_val_nll"] == 3.0
    assert info["limits"]["max_prime_chars"] == 300
    assert info["limits"]["auth_required"] is False


@pytest.mark.e2e
def test_request_id_echoed_or_created(server):
    r = httpx.get(f"{server.url}/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = httpx.get(f"{server.url}/health", headers={"X-Request-ID": "bad id\twith tab"})
    assert r.headers["x-request-id"] != "bad id\twith tab" and len(r.headers["x-request-id"]) == 32
    assert "abc-123" in server.log()


@pytest.mark.e2e
def test_openapi_lists_every_route_with_examples(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    for path in (
        "/generate",
        "/generate/stream",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/ready",
        "/info",
        "/metrics",
        "/",
    ):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/generate/stream"]) == {"get", "post"}
    assert spec["components"]["schemas"]["GenerateRequest"]["examples"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


# -- native generation --------------------------------------------------------------------


@pytest.mark.e2e
def test_generate_fields_and_determinism(server, vocab):
    a = generate(server, prime="Alice", max_new_chars=50, seed=42, temperature=0.9, top_k=5)
    assert a["model"] == "tiny" and a["prime"] == "Alice" and a["seed"] == 42
    assert len(a["generated_text"]) == 50 and a["finish_reason"] == "length"
    assert set(a["generated_text"]) <= set(vocab.chars)
    assert a["usage"] == {"prime_chars": 5, "generated_chars": 50}
    assert set(a["timings"]) == {"queue_ms", "warmup_ms", "generate_ms", "chars_per_s"}
    b = generate(server, prime="Alice", max_new_chars=50, seed=42, temperature=0.9, top_k=5)
    assert a["generated_text"] == b["generated_text"]
    c = generate(server, prime="Alice", max_new_chars=50, seed=43, temperature=0.9, top_k=5)
    assert c["generated_text"] != a["generated_text"]


@pytest.mark.e2e
def test_native_kernels_can_be_switched_off(tmp_path, tiny_checkpoint):
    with run_server(tmp_path, f"tiny={tiny_checkpoint}", native_kernels="false") as s:
        (m,) = httpx.get(f"{s.url}/info").json()["models"]
        assert (m["decode_weights"], m["decode_kernels"]) == ("int8", "eager")
        done = httpx.post(f"{s.url}/generate", json={"prime": "Alice", "max_new_chars": 20})
        assert done.status_code == 200 and len(done.json()["generated_text"]) == 20


@pytest.mark.e2e
def test_server_picks_and_returns_a_seed(server):
    a = generate(server, prime="The", max_new_chars=30)
    assert 0 <= a["seed"] < 2**63
    again = generate(server, prime="The", max_new_chars=30, seed=a["seed"])
    assert again["generated_text"] == a["generated_text"]


@pytest.mark.e2e
def test_generate_matches_the_reference_sampler(server, tiny_checkpoint):
    from charrnn import SamplingParams
    from charrnn.decode import StepDecoder
    from charrnn.generate import generate as reference

    ckpt = load_checkpoint(tiny_checkpoint)
    # The server decodes in int8 on the CPU by default.
    decoder = StepDecoder(ckpt.model, "int8")
    want = reference(ckpt.model, ckpt.vocab, "Queen", 60, SamplingParams(0.8, 10, 0.95, 5), decoder)
    got = generate(
        server, prime="Queen", max_new_chars=60, temperature=0.8, top_k=10, top_p=0.95, seed=5
    )
    assert got["generated_text"] == want


@pytest.mark.e2e
def test_sse_post_framing_equals_generate(server):
    body = {"prime": "Alice was", "max_new_chars": 80, "seed": 7, "top_p": 0.9}
    events, resp = stream(server, **body)
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    kinds = [e for e, _ in events]
    assert kinds == ["start"] + ["token"] * 80 + ["done"]
    assert events[0][1] == {"model": "tiny", "seed": 7, "prime_chars": 9}
    tokens = [d for e, d in events if e == "token"]
    assert [t["index"] for t in tokens] == list(range(80))
    done = events[-1][1]
    assert done["generated_text"] == "".join(t["text"] for t in tokens)
    assert done["generated_text"] == generate(server, **body)["generated_text"]
    assert done["finish_reason"] == "length" and done["seed"] == 7
    assert done["usage"] == {"prime_chars": 9, "generated_chars": 80}


@pytest.mark.e2e
def test_sse_get_with_query_parameters(server):
    params = {"prime": "The", "max_new_chars": 40, "seed": 3, "temperature": 0.7}
    events, _ = stream(server, "GET", **params)
    assert events[-1][0] == "done"
    assert events[-1][1]["generated_text"] == generate(server, **params)["generated_text"]


@pytest.mark.e2e
def test_stop_sequences(server):
    base = {"prime": "Alice", "max_new_chars": 300, "seed": 11}
    text = generate(server, **base)["generated_text"]
    stop_a, stop_b = text[60:63], text[200:202]
    want = text[: min(text.index(stop_a), text.index(stop_b))]
    got = generate(server, **base, stop=[stop_a, stop_b])
    assert got["finish_reason"] == "stop"
    assert got["generated_text"] == want
    assert got["usage"]["generated_chars"] == len(want)
    # Streamed tokens never include the stop string, and they equal the JSON answer.
    events, _ = stream(server, "GET", **base, stop=[stop_a, stop_b])
    tokens = "".join(d["text"] for e, d in events if e == "token")
    assert tokens == want == events[-1][1]["generated_text"]
    assert events[-1][1]["finish_reason"] == "stop"


@pytest.mark.e2e
@pytest.mark.parametrize("temperature", [1e-40, 1e-46])  # 1e-46 is 0 in float32
def test_a_vanishing_temperature_is_greedy_decoding(server, temperature):
    """Any temperature > 0 is valid; one so small that logits / T overflow float32 must decode
    greedily, not fail the batch."""
    body = {"prime": "Alice", "max_new_chars": 40, "seed": 3}
    got = generate(server, **body, temperature=temperature)["generated_text"]
    assert got == generate(server, **body, top_k=1)["generated_text"]


@pytest.mark.e2e
def test_same_seed_same_text_alone_and_among_16_concurrent(server):
    body = {"prime": "Alice was beginning", "max_new_chars": 120, "seed": 99, "top_k": 8}
    alone = generate(server, **body)["generated_text"]

    async def crowd() -> list[str]:
        async with httpx.AsyncClient(timeout=60) as c:

            async def one(i: int) -> str:
                b = (
                    body
                    if i == 7
                    else {
                        "prime": "The Queen"[: 3 + i % 6],
                        "seed": i,
                        "max_new_chars": 50 + 10 * i,
                        "temperature": 1.2,
                    }
                )
                r = await c.post(f"{server.url}/generate", json=b)
                assert r.status_code == 200
                return r.json()["generated_text"]

            return await asyncio.gather(*(one(i) for i in range(16)))

    results = asyncio.run(crowd())
    assert results[7] == alone
    assert server.metric("charrnn_batch_size_count", model="tiny") > 0


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_metrics_exposition(server):
    generate(server, prime="Alice", max_new_chars=10, seed=1)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "charrnn_requests_total",
        "charrnn_time_to_first_char_seconds",
        "charrnn_inter_char_seconds",
        "charrnn_request_duration_seconds",
        "charrnn_queue_depth",
        "charrnn_active_generations",
        "charrnn_batch_size",
        "charrnn_generated_characters_total",
        "charrnn_decode_seconds_total",
    ):
        assert name in text, name
    assert server.metric("charrnn_requests_total", route="/generate", status="200") >= 1
    assert server.metric("charrnn_decode_seconds_total", model="tiny") > 0
    assert server.metric("charrnn_generated_characters_total", model="tiny") >= 10


@pytest.mark.e2e
def test_prime_cache_hit(server):
    before = server.metric("charrnn_prime_cache_total", model="tiny", result="hit")
    generate(server, prime="A little white rabbit", max_new_chars=5, seed=1)
    generate(server, prime="A little white rabbit", max_new_chars=5, seed=2)
    assert server.metric("charrnn_prime_cache_total", model="tiny", result="hit") == before + 1


# -- OpenAI compatibility -----------------------------------------------------------------


@pytest.mark.e2e
def test_openai_sdk_plain_and_streaming(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    request = {
        "model": "tiny",
        "prompt": "Alice",
        "max_tokens": 40,
        "seed": 5,
        "temperature": 0.8,
        "top_p": 0.9,
        "extra_body": {"top_k": 6},
    }
    c = client.completions.create(**request)
    native = generate(
        server, prime="Alice", max_new_chars=40, seed=5, temperature=0.8, top_p=0.9, top_k=6
    )
    assert c.object == "text_completion" and c.model == "tiny"
    assert c.choices[0].text == native["generated_text"]
    assert c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (5, 40, 45)
    chunks = list(
        client.completions.create(**request, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == native["generated_text"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40 and not chunks[-1].choices
    # Stop strings and greedy decoding.
    s = client.completions.create(
        model="tiny",
        prompt="Alice",
        max_tokens=300,
        seed=5,
        stop=native["generated_text"][10:12],
        temperature=0,
    )
    assert s.choices[0].finish_reason in ("stop", "length")


@pytest.mark.e2e
def test_openai_errors_use_openai_shape(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Alice", "temperature": 50})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "temperature"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Al\u2603ce"})
    assert r.status_code == 400 and "'\u2603' at position 2" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Alice", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Alice", "n": 2})
    assert r.status_code == 400


# -- validation ---------------------------------------------------------------------------

INVALID = [
    ({"prime": ""}, "prime"),
    ({"prime": "a" * 301}, "prime"),
    ({"max_new_chars": 0}, "max_new_chars"),
    ({"max_new_chars": 1_000_001}, "max_new_chars"),
    ({"max_new_chars": "many"}, "max_new_chars"),
    ({"temperature": 10.5}, "temperature"),
    ({"temperature": -1}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 10_000}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x" * 65]}, "stop"),
    ({"stop": "abc"}, "stop"),
    ({"unknown_field": 1}, "unknown_field"),
]


@pytest.mark.e2e
@pytest.mark.parametrize(("patch", "field"), INVALID)
def test_invalid_field_is_422_naming_it(server, patch, field):
    body = {"prime": "Alice", **patch}
    r = httpx.post(f"{server.url}/generate", json=body)
    assert r.status_code == 422, r.text
    assert field in [str(p) for e in r.json()["detail"] for p in e["loc"]]
    r = httpx.post(f"{server.url}/generate/stream", json=body)
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"


@pytest.mark.e2e
def test_unknown_characters_named_with_positions(server):
    r = httpx.post(f"{server.url}/generate", json={"prime": "Al\u00e9ce\u00e9\x00"})
    assert r.status_code == 422
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "prime"]
    assert "'\u00e9' at position 2" in err["msg"] and "'\\x00' at position 6" in err["msg"]
    r = httpx.get(f"{server.url}/generate/stream", params={"prime": "Z\u2603"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "prime"]


@pytest.mark.e2e
def test_unknown_model_is_404(server):
    r = httpx.post(f"{server.url}/generate", json={"prime": "Alice", "model": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["detail"]


@pytest.mark.e2e
def test_body_over_limit_is_413(server):
    r = httpx.post(
        f"{server.url}/generate",
        content=b'{"prime": "' + b"a" * 70000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


# -- limits, auth, start-up ---------------------------------------------------------------


@pytest.mark.e2e
def test_429_when_batch_and_queue_are_full(tiny_checkpoint, tmp_path):
    # Generations long enough (and a backlog deep enough for a reader that does not read) that
    # neither slot frees itself while the test runs: the tiny model writes ~20,000 chars/s.
    long = 10**6
    with run_server(
        tmp_path,
        f"tiny={tiny_checkpoint}",
        max_concurrent=1,
        max_queue=1,
        max_new_chars_limit=long,
        stream_backlog=long,
    ) as s:

        async def run() -> None:
            async with httpx.AsyncClient(timeout=60) as c:
                body = {"prime": "Alice", "max_new_chars": long}
                async with (
                    aconnect_sse(c, "POST", f"{s.url}/generate/stream", json=body) as a,
                    aconnect_sse(c, "POST", f"{s.url}/generate/stream", json=body) as b,
                ):
                    assert a.response.status_code == b.response.status_code == 200
                    r = await c.post(f"{s.url}/generate", json=body)
                    assert r.status_code == 429
                    assert r.headers["retry-after"] == "1"
                    assert "retry" in r.json()["detail"]
                    r = await c.get(f"{s.url}/generate/stream", params={"prime": "Alice"})
                    assert r.status_code == 429
                    assert (await c.get(f"{s.url}/health")).status_code == 200

        asyncio.run(run())


@pytest.mark.e2e
def test_api_keys(tiny_checkpoint, tmp_path):
    with run_server(tmp_path, f"tiny={tiny_checkpoint}", api_keys="k-one,k-two") as s:
        body = {"prime": "Alice", "max_new_chars": 5}
        assert httpx.post(f"{s.url}/generate", json=body).status_code == 401
        bad = httpx.post(f"{s.url}/generate", json=body, headers={"Authorization": "Bearer x"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        for key in ("k-one", "k-two"):
            ok = httpx.post(
                f"{s.url}/generate", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "Alice"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{s.url}/generate/stream", params=body).status_code == 401
        for route in ("/health", "/ready", "/info", "/metrics"):
            assert httpx.get(f"{s.url}{route}").status_code == 200
        assert "k-one" not in s.log() and "k-two" not in s.log()


def test_ready_is_503_before_the_models_are_loaded(tiny_checkpoint):
    from app.config import Settings
    from app.main import create_app

    app = create_app(Settings(models=f"tiny={tiny_checkpoint}"))

    async def probe() -> None:
        # No lifespan has run: nothing is loaded yet.
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert (await c.get("/health")).status_code == 200
            r = await c.post("/generate", json={"prime": "Alice"})
            assert r.status_code == 503

    asyncio.run(probe())
