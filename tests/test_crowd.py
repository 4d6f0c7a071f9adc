"""Every per-row option in one batch: each row answers what its request answers alone.

Crowds of 2 to 64 requests drawn at random (tests/crowd.py) are sent at once, so their rows
share decode calls, then each one alone; a client that gives up part-way must not change
anyone else's text. In-process with the tiny model; once on a real server with the shipped
model (e2e). And a failure in one row's events ends that row alone."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from pathlib import Path

import httpx
import pytest
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families

from app.engine.stops import StopMatcher
from charrnn.checkpoint import load_checkpoint, save_checkpoint
from charrnn.textindex import TextIndex, index_path
from tests.conftest import fit_tiny, generate, make_text, run
from tests.crowd import Case, Texts, crowd_and_alone, random_case
from tests.server import run_server

ROOT = Path(__file__).resolve().parents[1]
TINY = Texts(
    make_text(8000, seed=5),
    regexes=("[a-z ]{1,20}", "(alice|queen) [a-z]+", "[a-z]+[.!?]"),
    choices=(("alice", "queen", "hatter"), ("yes", "no")),
)


async def _batched_calls(c: httpx.AsyncClient) -> tuple[float, float]:
    """The decode calls so far, and those of them that stepped more than one row."""
    text = (await c.get("/metrics")).text
    count = one = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "charrnn_batch_size_count":
                count += s.value
            elif s.name == "charrnn_batch_size_bucket" and s.labels["le"] == "1.0":
                one += s.value
    return count, count - one


def _check(pairs: list[tuple[Case, object, object]]) -> None:
    for case, together, alone in pairs:
        assert together == alone, f"{case.labels}: {json.dumps(case.body)[:300]}"


@pytest.mark.parametrize("seed", [0, 1])
def test_each_row_of_a_mixed_crowd_answers_as_alone(tiny_checkpoint, seed):
    rng = random.Random(seed)

    async def test(c: httpx.AsyncClient) -> None:
        for size in (2, 5, 17, 64):
            cases = [random_case(rng, TINY) for _ in range(size)]
            before = await _batched_calls(c)
            pairs = await crowd_and_alone(c, cases)
            _check(pairs)
            after = await _batched_calls(c)
            if size > 10:
                assert after[1] > before[1], "no decode call stepped two rows: not a crowd"
            assert len(pairs) >= size // 2

    # A small prime budget: long primes are primed in several parts beside running rows.
    run(tiny_checkpoint, test, prime_budget=256, max_concurrent=64)


def test_a_crowd_with_the_copy_guard_answers_as_alone(tiny_checkpoint, tmp_path):
    """A tiny model fitted on the crowd's own text, served with its index: it copies the
    text, so the guard bites."""
    vocab = load_checkpoint(tiny_checkpoint).vocab
    ckpt = tmp_path / "copier.pt"
    save_checkpoint(ckpt, fit_tiny(TINY.text, vocab, hidden=64, lr=0.02, steps=200)[0], vocab, {})
    TextIndex.build(TINY.text, vocab).save(index_path(ckpt))
    texts = dataclasses.replace(TINY, guard=True)
    rng = random.Random(2)

    async def test(c: httpx.AsyncClient) -> None:
        assert (await c.get("/info")).json()["models"][0]["text_index"] is not None
        body = {"prime": TINY.text[:40], "max_new_chars": 60, "seed": 1}
        free = (await generate(c, **body))["generated_text"]
        assert (await generate(c, **body, max_copy_chars=4))["generated_text"] != free
        for size in (5, 40):
            cases = [random_case(rng, texts) for _ in range(size)]
            _check(await crowd_and_alone(c, cases))
            assert any("copy guard" in case.labels for case in cases)

    run(ckpt, test, prime_budget=256, max_concurrent=64)


def test_logprobs_and_no_logprobs_in_one_call(tiny_checkpoint):
    """The first report: two requests at once, one asking for logprobs, both answered 200
    with their texts alone (every decode path: plain, stop strings, a constraint)."""

    async def test(c: httpx.AsyncClient) -> None:
        for extra in ({}, {"stop": ["qq"]}, {"constraint": {"regex": "[a-z ]+"}}):
            a = {"prime": "Alice", "max_new_chars": 400, "seed": 1, **extra}
            b = {**a, "seed": 2, "logprobs": 0}
            cases = [Case("json", a), Case("json", b), Case("sse", {**a, "logprobs": 3})]
            _check(await crowd_and_alone(c, cases))

    run(tiny_checkpoint, test)


FAULT_MAX_NEW = 77  # a request asking for this many characters has its events fail


@pytest.fixture
def faulty_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    push = StopMatcher.push

    def faulty(self: StopMatcher, *args, **kwargs):
        if self.max_new == FAULT_MAX_NEW and len(self) > 10:
            raise RuntimeError("injected row fault")
        return push(self, *args, **kwargs)

    monkeypatch.setattr(StopMatcher, "push", faulty)


def test_a_failure_in_one_rows_events_ends_that_row_alone(tiny_checkpoint, faulty_rows):
    """The faulty row gets a 500 (whole text) or an ``error`` event (stream); every other
    row of the same calls answers as alone, and the model is not marked failing."""

    async def test(c: httpx.AsyncClient) -> None:
        good = [
            Case("json", {"prime": "Alice", "max_new_chars": 300, "seed": s, "logprobs": lp})
            for s, lp in ((1, None), (2, 0), (3, 2))
        ]
        bad = {"prime": "Alice", "max_new_chars": FAULT_MAX_NEW, "seed": 9}

        async def bad_json() -> httpx.Response:
            return await c.post("/generate", json=bad)

        async def bad_stream() -> list[tuple[str, dict]]:
            async with aconnect_sse(c, "POST", "/generate/stream", json=bad) as es:
                return [(e.event, json.loads(e.data)) async for e in es.aiter_sse()]

        for _ in range(4):  # more than the failures that would mark a model failing
            together = asyncio.gather(*(crowd_and_alone(c, [g]) for g in good))
            pairs, r, events = await asyncio.gather(together, bad_json(), bad_stream())
            _check([p for row in pairs for p in row])
            assert r.status_code == 500 and "injected row fault" in r.json()["detail"]
            assert events[0][0] == "start" and events[-1][0] == "error"
            assert "injected row fault" in events[-1][1]["message"]
        assert (await c.get("/ready")).status_code == 200

    run(tiny_checkpoint, test)


SHIPPED = ROOT / "models" / "alice.pt"


@pytest.mark.e2e
@pytest.mark.slow
def test_a_crowd_on_a_real_server_with_the_shipped_model(tmp_path):
    """Real sockets: clients that give up disconnect for real, mid-stream."""
    alice = "Alice was beginning to get very tired of sitting by her sister on the bank, "
    texts = Texts(
        alice * 30,
        regexes=("[a-z ]{1,30}", "(Alice|Queen) [a-z]+", "[A-Za-z]+[.!?]"),
        choices=(("Alice", "Queen", "Hatter"), ("yes", "no")),
        guard=True,  # the shipped model has its text index
    )
    rng = random.Random(27)
    cases = [random_case(rng, texts, max_new=300) for _ in range(48)]

    async def main(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            _check(await crowd_and_alone(c, cases))

    with run_server(tmp_path, f"alice={SHIPPED}", prime_budget=256) as s:
        asyncio.run(main(s.url))
        assert s.metric("charrnn_batch_size_count") > s.metric(
            "charrnn_batch_size_bucket", le="1.0"
        )
