"""The native and operations routes in-process: the ASGI app with its lifespan (models loaded,
decode threads running) driven through httpx's ASGI transport (tests/conftest.py's ``run``).
No server process, no socket; what needs a real socket (disconnects, a stalled reader,
signals) is in the e2e tests (tests/test_service.py, tests/test_reliability.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import httpx
import pytest

from charrnn import load_checkpoint, native
from tests.conftest import Client, events, generate, run, scrape

# Limits that the validation cases below cross (a 301-character prime, 1,000,001 characters).
LIMITS = {"max_prime_chars": 300, "max_new_chars_limit": 1_000_000}


# -- operations ----------------------------------------------------------------------------


def test_health_ready_and_info(tiny_checkpoint, vocab):
    async def test(c: Client) -> None:
        assert (await c.get("/health")).json() == {"status": "ok"}
        ready = {"status": "ready", "models": {"tiny": True}, "failing": {}}
        assert (await c.get("/ready")).json() == ready
        info = (await c.get("/info")).json()
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

    run(tiny_checkpoint, test, **LIMITS)


def test_openapi_lists_every_route_with_examples(tiny_checkpoint):
    async def test(c: Client) -> None:
        spec = (await c.get("/openapi.json")).json()
        for path in (
            "/generate",
            "/generate/stream",
            "/v1/completions",
            "/v1/models",
            "/score",
            "/health",
            "/ready",
            "/info",
            "/metrics",
            "/",
        ):
            assert path in spec["paths"], path
        assert set(spec["paths"]["/generate/stream"]) == {"get", "post"}
        assert spec["components"]["schemas"]["GenerateRequest"]["examples"]
        assert (await c.get("/docs")).status_code == 200

    run(tiny_checkpoint, test)


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


def test_native_kernels_can_be_switched_off(tiny_checkpoint):
    async def test(c: Client) -> None:
        (m,) = (await c.get("/info")).json()["models"]
        assert (m["decode_weights"], m["decode_kernels"]) == ("int8", "eager")
        done = await generate(c, prime="Alice", max_new_chars=20)
        assert len(done["generated_text"]) == 20

    run(tiny_checkpoint, test, native_kernels=False)


# -- request ids, keys, limits -------------------------------------------------------------


def test_request_id_echoed_or_created(tiny_checkpoint, caplog):
    """A safe ``X-Request-ID`` is echoed, anything else replaced by a new id; the access log
    names each request by the id its answer carries."""
    caplog.set_level(logging.INFO, logger="charrnn.access")
    ids: list[str] = []

    async def test(c: Client) -> None:
        r = await c.get("/health", headers={"X-Request-ID": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        r = await c.get("/health", headers={"X-Request-ID": "bad id\twith tab"})
        ids.append(r.headers["x-request-id"])
        assert ids[0] != "bad id\twith tab" and len(ids[0]) == 32
        r = await c.post("/generate", json={"prime": "Alice", "max_new_chars": 3})
        ids.append(r.headers["x-request-id"])
        assert len(ids[1]) == 32 and ids[1] != ids[0]

    run(tiny_checkpoint, test)
    access = [r.getMessage() for r in caplog.records if r.name == "charrnn.access"]
    for route, request_id in (("GET /health", "abc-123"), ("GET /health", ids[0])):
        assert any(f'"{route}" 200' in a and f"id={request_id}" in a for a in access), access
    assert any('"POST /generate" 200' in a and f"id={ids[1]}" in a for a in access), access


def test_api_keys(tiny_checkpoint, caplog):
    caplog.set_level(logging.DEBUG)

    async def test(c: Client) -> None:
        body = {"prime": "Alice", "max_new_chars": 5}
        assert (await c.post("/generate", json=body)).status_code == 401
        bad = await c.post("/generate", json=body, headers={"Authorization": "Bearer x"})
        assert bad.status_code == 401 and bad.headers["www-authenticate"] == "Bearer"
        for key in ("k-one", "k-two"):
            ok = await c.post("/generate", json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        r = await c.post("/v1/completions", json={"prompt": "Alice"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert (await c.get("/generate/stream", params=body)).status_code == 401
        for route in ("/health", "/ready", "/info", "/metrics"):
            assert (await c.get(route)).status_code == 200
        assert (await c.get("/info")).json()["limits"]["auth_required"] is True

    run(tiny_checkpoint, test, api_keys="k-one,k-two")
    assert '"POST /generate" 200' in caplog.text  # the log was captured ...
    assert "k-one" not in caplog.text and "k-two" not in caplog.text  # ... and has no key


def test_body_over_limit_is_413(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post(
            "/generate",
            content=b'{"prime": "' + b"a" * 70000 + b'"}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and "CHARRNN_MAX_BODY_BYTES" in r.json()["detail"]

    run(tiny_checkpoint, test)


def test_429_when_the_batch_and_queue_are_full(tiny_checkpoint):
    """Admission counts the generations someone waits for: the third of a batch of one and
    a queue of one is refused before any work, with Retry-After, on every generation route;
    the operations routes still answer."""

    async def test(c: Client) -> None:
        long = {"prime": "Alice", "max_new_chars": 100_000, "seed": 1}
        held = [asyncio.ensure_future(c.post("/generate", json=long)) for _ in range(2)]
        await asyncio.sleep(0.2)
        r = await c.post("/generate", json={"prime": "Alice"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "retry" in r.json()["detail"]
        r = await c.get("/generate/stream", params={"prime": "Alice"})
        assert r.status_code == 429
        assert (await c.get("/health")).status_code == 200
        assert all(not task.done() for task in held)  # both were still held
        for task in held:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*held)

    run(tiny_checkpoint, test, max_concurrent=1, max_queue=1, max_new_chars_limit=100_000)


# -- native generation ---------------------------------------------------------------------


def test_generate_fields_and_determinism(tiny_checkpoint, vocab):
    async def test(c: Client) -> None:
        body = {"prime": "Alice", "max_new_chars": 50, "temperature": 0.9, "top_k": 5}
        a = await generate(c, **body, seed=42)
        assert a["model"] == "tiny" and a["prime"] == "Alice" and a["seed"] == 42
        assert len(a["generated_text"]) == 50 and a["finish_reason"] == "length"
        assert set(a["generated_text"]) <= set(vocab.chars)
        assert a["usage"] == {"prime_chars": 5, "generated_chars": 50}
        assert set(a["timings"]) == {"queue_ms", "warmup_ms", "generate_ms", "chars_per_s"}
        assert (await generate(c, **body, seed=42))["generated_text"] == a["generated_text"]
        assert (await generate(c, **body, seed=43))["generated_text"] != a["generated_text"]

    run(tiny_checkpoint, test)


def test_server_picks_and_returns_a_seed(tiny_checkpoint):
    async def test(c: Client) -> None:
        a = await generate(c, prime="The", max_new_chars=30)
        assert 0 <= a["seed"] < 2**63
        again = await generate(c, prime="The", max_new_chars=30, seed=a["seed"])
        assert again["generated_text"] == a["generated_text"]

    run(tiny_checkpoint, test)


def test_generate_matches_the_reference_sampler(tiny_checkpoint):
    from charrnn import SamplingParams
    from charrnn.decode import StepDecoder
    from charrnn.generate import generate as reference

    ckpt = load_checkpoint(tiny_checkpoint)
    # The service decodes in int8 on the CPU by default.
    decoder = StepDecoder(ckpt.model, "int8")
    want = reference(ckpt.model, ckpt.vocab, "Queen", 60, SamplingParams(0.8, 10, 0.95, 5), decoder)

    async def test(c: Client) -> None:
        got = await generate(
            c, prime="Queen", max_new_chars=60, temperature=0.8, top_k=10, top_p=0.95, seed=5
        )
        assert got["generated_text"] == want

    run(tiny_checkpoint, test)


def test_generate_and_both_streams_give_one_text(tiny_checkpoint):
    """The JSON answer, the POST stream and the GET stream of one request and seed: one
    ``start``, one ``token`` per character counting from 0, ``done`` with their text."""

    async def test(c: Client) -> None:
        body = {"prime": "Alice was", "max_new_chars": 80, "seed": 7, "top_p": 0.9}
        whole = await generate(c, **body)
        assert whole["finish_reason"] == "length" and len(whole["generated_text"]) == 80
        assert whole["usage"] == {"prime_chars": 9, "generated_chars": 80}
        for method in ("POST", "GET"):
            got = await events(c, method, **body)
            assert [kind for kind, _ in got] == ["start"] + ["token"] * 80 + ["done"]
            start = {
                "model": "tiny",
                "checkpoint": whole["checkpoint"],
                "seed": 7,
                "prime_chars": 9,
            }
            assert got[0][1] == start
            tokens = [data for kind, data in got if kind == "token"]
            assert [t["index"] for t in tokens] == list(range(80))
            done = got[-1][1]
            assert done["generated_text"] == "".join(t["text"] for t in tokens)
            assert done["generated_text"] == whole["generated_text"]
            assert done["finish_reason"] == "length" and done["seed"] == 7
            assert done["usage"] == {"prime_chars": 9, "generated_chars": 80}

    run(tiny_checkpoint, test)


def test_stop_sequences(tiny_checkpoint):
    async def test(c: Client) -> None:
        base = {"prime": "Alice", "max_new_chars": 300, "seed": 11}
        text = (await generate(c, **base))["generated_text"]
        stop_a, stop_b = text[60:63], text[200:202]
        want = text[: min(text.index(stop_a), text.index(stop_b))]
        got = await generate(c, **base, stop=[stop_a, stop_b])
        assert got["finish_reason"] == "stop"
        assert got["generated_text"] == want
        assert got["usage"]["generated_chars"] == len(want)
        # Streamed tokens never include the stop string, and they equal the JSON answer.
        streamed = await events(c, "GET", **base, stop=[stop_a, stop_b])
        tokens = "".join(d["text"] for e, d in streamed if e == "token")
        assert tokens == want == streamed[-1][1]["generated_text"]
        assert streamed[-1][1]["finish_reason"] == "stop"

    run(tiny_checkpoint, test)


# 1e-46 is 0 in float32
@pytest.mark.parametrize("temperature", [0, 1e-40, 1e-46])
def test_temperature_zero_or_vanishing_is_greedy_decoding(tiny_checkpoint, temperature):
    """Temperature 0 is greedy; any temperature > 0 is valid, and one so small that
    logits / T overflow float32 must decode greedily too, not fail the batch. Greedy is
    top-k 1, whatever the seed."""

    async def test(c: Client) -> None:
        body = {"prime": "Alice", "max_new_chars": 40}
        got = await generate(c, **body, temperature=temperature, seed=3)
        top1 = await generate(c, **body, top_k=1, seed=4)
        assert got["generated_text"] == top1["generated_text"]

    run(tiny_checkpoint, test)


# -- validation ----------------------------------------------------------------------------

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


def test_invalid_requests_are_422_naming_the_field_before_any_stream(tiny_checkpoint):
    async def test(c: Client) -> None:
        for patch, field in INVALID:
            for route in ("/generate", "/generate/stream"):
                r = await c.post(route, json={"prime": "Alice", **patch})
                assert r.status_code == 422, (route, patch, r.text)
                assert r.headers["content-type"] == "application/json"
                locs = [str(p) for e in r.json()["detail"] for p in e["loc"]]
                assert field in locs, (route, patch, locs)

    run(tiny_checkpoint, test, **LIMITS)


def test_unknown_characters_and_models(tiny_checkpoint):
    async def test(c: Client) -> None:
        r = await c.post("/generate", json={"prime": "Al\u00e9ce\u00e9\x00"})
        assert r.status_code == 422
        (err,) = r.json()["detail"]
        assert err["loc"] == ["body", "prime"]
        assert "'\u00e9' at position 2" in err["msg"] and "'\\x00' at position 6" in err["msg"]
        r = await c.get("/generate/stream", params={"prime": "Z\u2603"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "prime"]
        assert "'\u2603' at position 1" in r.json()["detail"][0]["msg"]
        r = await c.post("/generate", json={"prime": "Alice", "model": "nope"})
        assert r.status_code == 404 and "nope" in r.json()["detail"]

    run(tiny_checkpoint, test)


# -- metrics -------------------------------------------------------------------------------

EXPOSED = (
    "charrnn_requests_total",
    "charrnn_time_to_first_char_seconds",
    "charrnn_inter_char_seconds",
    "charrnn_request_duration_seconds",
    "charrnn_queue_depth",
    "charrnn_active_generations",
    "charrnn_priming_generations",
    "charrnn_batch_size",
    "charrnn_generated_characters_total",
    "charrnn_prime_characters_total",
    "charrnn_decode_seconds_total",
    "charrnn_slow_client_cutoffs_total",
    "charrnn_prime_cache_total",
)
# The samples of the model's series that one generation moves.
MODEL_SERIES = (
    "charrnn_generated_characters_total",
    "charrnn_prime_characters_total",
    "charrnn_decode_seconds_total",
    "charrnn_time_to_first_char_seconds_count",
    "charrnn_inter_char_seconds_count",
    "charrnn_batch_size_count",
    "charrnn_batch_size_sum",
    "charrnn_active_generations",
    "charrnn_queue_depth",
    "charrnn_priming_generations",
)


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


def test_metrics_move_by_what_each_request_did(tiny_checkpoint):
    """Each series moves by exactly what a request did: one request counted under its route
    and status, its characters generated (JSON and stream alike), one first character, its
    prime's characters, decode calls of one row each, and the gauges back at 0."""

    async def test(c: Client) -> None:
        text = (await c.get("/metrics")).text
        for name in EXPOSED:
            assert f"# TYPE {name} " in text, name

        async def requests(route: str, status: str) -> tuple[float, float]:
            m = await scrape(c, "charrnn_requests_total", route=route, status=status)
            d = await scrape(c, "charrnn_request_duration_seconds_count", route=route)
            return m["charrnn_requests_total"], d["charrnn_request_duration_seconds_count"]

        for route, n, ask in (
            ("/generate", 17, lambda body: generate(c, **body)),
            ("/generate/stream", 23, lambda body: events(c, **body)),
        ):
            counted = await requests(route, "200")
            before = await scrape(c, *MODEL_SERIES, model="tiny")
            await ask({"prime": "Alice", "max_new_chars": n, "seed": n})
            moved = _moved(before, await scrape(c, *MODEL_SERIES, model="tiny"))
            assert await requests(route, "200") == (counted[0] + 1, counted[1] + 1), route
            assert moved["charrnn_generated_characters_total"] == n, route
            assert moved["charrnn_time_to_first_char_seconds_count"] == 1, route
            calls = moved["charrnn_batch_size_count"]
            # The call that hands out the first character times no gap between characters.
            assert 1 <= calls <= n and moved["charrnn_inter_char_seconds_count"] == calls - 1
            assert moved["charrnn_batch_size_sum"] == calls, route  # one row in every call
            assert moved["charrnn_decode_seconds_total"] > 0, route
            # "Alice": its state is cached after the first time, and then primes nothing.
            assert moved["charrnn_prime_characters_total"] == (5 if n == 17 else 0), route
            for gauge in ("active_generations", "queue_depth", "priming_generations"):
                assert moved[f"charrnn_{gauge}"] == 0 and before[f"charrnn_{gauge}"] == 0
        # A refused request is counted under its status, and generates nothing.
        counted = await requests("/generate", "422")
        before = await scrape(c, *MODEL_SERIES, model="tiny")
        assert (await c.post("/generate", json={"prime": ""})).status_code == 422
        assert await requests("/generate", "422") == (counted[0] + 1, counted[1] + 1)
        assert _moved(before, await scrape(c, *MODEL_SERIES, model="tiny")) == dict.fromkeys(
            MODEL_SERIES, 0.0
        )

    run(tiny_checkpoint, test)


def test_prime_cache_counts_a_miss_then_a_hit(tiny_checkpoint):
    async def test(c: Client) -> None:
        names = ("charrnn_prime_cache_total", "charrnn_prime_characters_total")

        async def cache(result: str) -> float:
            return (await scrape(c, names[0], model="tiny", result=result))[names[0]]

        prime = "A little white rabbit"
        for expect in ("miss", "hit"):
            hits, misses = await cache("hit"), await cache("miss")
            primed = (await scrape(c, names[1], model="tiny"))[names[1]]
            await generate(c, prime=prime, max_new_chars=5, seed=1)
            assert (await cache("hit"), await cache("miss")) == (
                hits + (expect == "hit"),
                misses + (expect == "miss"),
            )
            # A miss runs the prime through the network; a hit runs nothing.
            now = (await scrape(c, names[1], model="tiny"))[names[1]]
            assert now - primed == (len(prime) if expect == "miss" else 0)

    run(tiny_checkpoint, test)


def test_batch_size_observes_rows_stepped_together(tiny_checkpoint):
    """Requests at once share decode calls: the batch-size histogram sees calls of more than
    one row, and never more rows than there were requests."""

    async def test(c: Client) -> None:
        names = ("charrnn_batch_size_count", "charrnn_batch_size_sum")
        before = await scrape(c, *names, model="tiny")
        bodies = [{"prime": "Alice", "max_new_chars": 2000, "seed": k} for k in range(4)]
        await asyncio.gather(*(generate(c, **b) for b in bodies))
        moved = _moved(before, await scrape(c, *names, model="tiny"))
        calls, rows = moved["charrnn_batch_size_count"], moved["charrnn_batch_size_sum"]
        assert calls < rows <= 4 * calls, moved

    run(tiny_checkpoint, test)
