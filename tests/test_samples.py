"""Many samples from one prime: a prime in progress is run once for every request that waits
for the same text, and a request's ``n`` samples (``best_of`` ranked) each equal the single
request with its seed."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import openai
import pytest
from httpx_sse import aconnect_sse

from app.engine.request import Done
from tests.conftest import CONTROLS, run
from tests.fakes import FakeRunner, make_gen, make_loop


def _finals(results: list) -> dict[int, Done]:
    return {g.key: e for g, events in results for e in events if isinstance(e, Done)}


def test_requests_with_the_same_prime_run_it_once():
    runner, results = FakeRunner(), []
    loop = make_loop(runner, results)
    gens = [make_gen("a" * 200) for _ in range(3)]
    for g in gens:
        loop.submit(g)
    for _ in range(12):
        loop._iterate()
    assert sum(runner.primed) == 200  # one prime's positions, not three
    finals = _finals(results)
    assert [finals[g.key].generated_text for g in gens] == ["bbbbb"] * 3


def test_a_follower_takes_over_a_prime_whose_leader_left():
    runner, results = FakeRunner(), []
    loop = make_loop(runner, results)
    leader, follower = make_gen("a" * 300), make_gen("a" * 300)
    loop.submit(leader)
    loop.submit(follower)
    loop._iterate()
    assert loop.priming[follower.key].follows
    loop.cancel(leader)
    for _ in range(12):
        loop._iterate()
    assert sum(runner.primed) == 300  # what the leader ran was not run again
    assert _finals(results)[follower.key].generated_text == "bbbbb"
    assert leader.key not in _finals(results)


# -- n and best_of on the routes ----------------------------------------------------------------

BODY = {"prime": "Alice ", "max_new_chars": 40, "temperature": 1.0, "seed": 11}


async def _alone(c: httpx.AsyncClient, seed: int, **extra: object) -> dict:
    r = await c.post("/generate", json={**BODY, "seed": seed, "logprobs": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def _mean(lps: list[float]) -> float:
    return sum(lps) / len(lps)


def test_n_samples_equal_the_single_requests_with_seed_plus_i(tiny_checkpoint):
    async def test(c: httpx.AsyncClient) -> None:
        r = await c.post("/generate", json={**BODY, "n": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        alone = [await _alone(c, 11 + i) for i in range(3)]
        assert [s["generated_text"] for s in body["samples"]] == [
            a["generated_text"] for a in alone
        ]
        assert [s["seed"] for s in body["samples"]] == [11, 12, 13]
        assert [s["index"] for s in body["samples"]] == [0, 1, 2]
        for s, a in zip(body["samples"], alone, strict=True):
            assert s["score"] == pytest.approx(_mean(a["logprobs"]["token_logprobs"]))
            assert "logprobs" not in s  # not asked for
        assert body["generated_text"] == alone[0]["generated_text"]
        assert body["usage"]["generated_chars"] == 3 * 40
        assert "logprobs" not in body

        streamed = await _sse(c, "POST", {**BODY, "n": 3})
        assert streamed[0][0] == "start" and streamed[0][1]["n"] == 3
        for i, a in enumerate(alone):
            tokens = [d for e, d in streamed if e == "token" and d["sample"] == i]
            assert "".join(t["text"] for t in tokens) == a["generated_text"]
            assert [t["index"] for t in tokens] == list(range(40))
        done = streamed[-1]
        assert done[0] == "done" and [s["generated_text"] for s in done[1]["samples"]] == [
            a["generated_text"] for a in alone
        ]
        # Each sample's score as on the JSON answer, from the logprobs its tokens carried.
        for s, want in zip(done[1]["samples"], body["samples"], strict=True):
            assert s["seed"] == want["seed"] and s["score"] == pytest.approx(want["score"])
        got = await _sse(c, "GET", {**BODY, "n": 3})
        for i in range(3):  # each sample's tokens alike (how samples interleave is timing)
            mine = [d for e, d in got if e == "token" and d["sample"] == i]
            assert mine == [d for e, d in streamed if e == "token" and d["sample"] == i]

    run(tiny_checkpoint, test)


async def _sse(c: httpx.AsyncClient, method: str, body: dict) -> list[tuple[str, dict]]:
    kwargs = {"json": body} if method == "POST" else {"params": body}
    async with aconnect_sse(c, method, "/generate/stream", **kwargs) as es:
        assert es.response.status_code == 200
        return [(e.event, json.loads(e.data)) async for e in es.aiter_sse()]


def test_best_of_returns_the_n_best_by_mean_logprob(tiny_checkpoint):
    async def test(c: httpx.AsyncClient) -> None:
        r = await c.post("/generate", json={**BODY, "n": 2, "best_of": 5, "logprobs": 1})
        assert r.status_code == 200, r.text
        body = r.json()
        alone = [await _alone(c, 11 + i, logprobs=1) for i in range(5)]
        scores = [_mean(a["logprobs"]["token_logprobs"]) for a in alone]
        best = sorted(range(5), key=lambda i: -scores[i])[:2]
        assert [s["seed"] for s in body["samples"]] == [11 + i for i in best]
        assert [s["generated_text"] for s in body["samples"]] == [
            alone[i]["generated_text"] for i in best
        ]
        assert body["samples"][0]["logprobs"] == alone[best[0]]["logprobs"]  # asked for
        assert body["seed"] == 11 + best[0] and body["logprobs"] == alone[best[0]]["logprobs"]
        assert body["usage"]["generated_chars"] == 5 * 40  # every sample drawn counts

    run(tiny_checkpoint, test)


def test_openai_n_and_best_of(tiny_checkpoint):
    async def test(c: httpx.AsyncClient) -> None:
        client = openai.AsyncOpenAI(base_url="http://app/v1", api_key="-", http_client=c)
        out = await client.completions.create(
            model="tiny", prompt=["Alice ", "the "], max_tokens=20, n=2, seed=5
        )
        assert [ch.index for ch in out.choices] == [0, 1, 2, 3]
        for k, (prompt, i) in enumerate([("Alice ", 0), ("Alice ", 1), ("the ", 0), ("the ", 1)]):
            single = await client.completions.create(
                model="tiny", prompt=prompt, max_tokens=20, seed=5 + i
            )
            assert out.choices[k].text == single.choices[0].text
            assert out.choices[k].logprobs is None
        assert out.usage.prompt_tokens == len("Alice ") + len("the ")
        assert out.usage.completion_tokens == 4 * 20
        streamed = await client.completions.create(
            model="tiny", prompt="Alice ", max_tokens=20, n=2, seed=5, stream=True
        )
        texts = ["", ""]
        async for chunk in streamed:
            for ch in chunk.choices:
                texts[ch.index] += ch.text
                assert ch.logprobs is None
        assert texts == [out.choices[0].text, out.choices[1].text]
        best = await client.completions.create(
            model="tiny", prompt="Alice ", max_tokens=20, n=1, best_of=4, seed=5, logprobs=0
        )
        scored = []
        for i in range(4):
            single = await client.completions.create(
                model="tiny", prompt="Alice ", max_tokens=20, seed=5 + i, logprobs=0
            )
            scored.append((_mean(single.choices[0].logprobs.token_logprobs), single))
        top = max(scored, key=lambda p: p[0])[1]
        assert best.choices[0].text == top.choices[0].text

    run(tiny_checkpoint, test)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 17}, "best_of"),
        ({"n": 5}, "n"),  # more than max_concurrent: can never run at once
    ],
)
def test_bad_sample_counts_are_422_naming_the_field(tiny_checkpoint, patch, field):
    async def test(c: httpx.AsyncClient) -> None:
        r = await c.post("/generate", json={**BODY, **patch})
        assert r.status_code == 422, r.text
        assert any(field in e["loc"] for e in r.json()["detail"]), r.text
        r = await c.post("/generate/stream", json={**BODY, "best_of": 2})
        assert r.status_code == 422 and "best_of" in r.text  # not with streaming
        r = await c.post("/v1/completions", json={"prompt": "Alice", **patch})
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
        assert (await c.post("/generate", json=BODY)).status_code == 200  # still serving

    run(tiny_checkpoint, test, max_concurrent=4)


def test_samples_take_their_places_together(tiny_checkpoint):
    """A request's n samples take n places: refused (429) when they do not all fit now."""

    async def test(c: httpx.AsyncClient) -> None:
        long = {"prime": "Alice", "max_new_chars": 100_000, "seed": 1}
        held = asyncio.ensure_future(c.post("/generate", json=long))
        await asyncio.sleep(0.2)
        r = await c.post("/generate", json={**BODY, "n": 4})
        assert r.status_code == 429
        r = await c.post("/generate", json={**BODY, "n": 3})
        assert r.status_code == 200 and len(r.json()["samples"]) == 3
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held

    run(tiny_checkpoint, test, max_concurrent=4, max_queue=0, max_new_chars_limit=100_000)


def test_info_lists_the_controls_and_their_rules(tiny_checkpoint):
    async def test(c: httpx.AsyncClient) -> None:
        limits = (await c.get("/info")).json()["limits"]
        assert limits["max_n"] == 5
        rules = {r["name"]: r for r in limits["controls"]}
        assert set(rules) >= {"n", "best_of", *CONTROLS}
        assert rules["n"]["maximum"] == 5 and rules["best_of"]["default"] is None
        assert rules["dry_base"] == {**rules["dry_base"], "minimum": 1, "exclusive_minimum": True}
        assert rules["banned_strings"]["max_items"] == 64
        assert rules["dry_sequence_breakers"]["default"] == ["\n"]

    run(tiny_checkpoint, test, max_n=5)
