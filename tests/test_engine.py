"""Unit tests of the scheduler and a generation's text bookkeeping (no HTTP)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from app.backend import ModelBackend
from app.engine import Done, Failed, Generation, Overloaded, Scheduler, ShuttingDown, Token
from app.metrics import Metrics
from charrnn import SamplingParams, Vocabulary
from charrnn.checkpoint import Checkpoint
from charrnn.generate import generate
from tests.conftest import make_text, tiny_model


def _gen(**kw) -> Generation:
    base = dict(
        prime="a", max_new=100, temperature=1.0, top_k=None, top_p=1.0, seed=0, stop=[], backlog=64
    )
    return Generation(**{**base, **kw})


def _tokens(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, Token))


def test_stop_string_is_held_back_and_never_streamed():
    gen = _gen(stop=["abc"])
    assert _tokens(gen.push("x") + gen.push("a") + gen.push("b")) == "x"  # "ab" may begin "abc"
    assert _tokens(gen.push("d")) == "abd"
    assert gen.push("a") + gen.push("b") == []
    events = gen.push("c")
    assert events == [Done("xabd", "stop")] and gen.finished


def test_length_finish_flushes_held_characters_and_indices_count_up():
    gen = _gen(stop=["zz"], max_new=3)
    events = gen.push("a") + gen.push("z") + gen.push("y")
    assert events == [Token(0, "a"), Token(1, "zy"), Done("azy", "length")]


@pytest.mark.parametrize(
    ("stop", "runs", "want"),
    [
        # A run past the length limit: cut at the limit.
        ([], ["abcdef"], [Token(0, "abcd"), Done("abcd", "length")]),
        # A stop string inside a run: the text ends before it, the rest is dropped.
        (["cd"], ["abcdef"], [Token(0, "ab"), Done("ab", "stop")]),
        # A stop string across runs: its first characters were held back, never streamed.
        (["abc"], ["xa", "bcz"], [Token(0, "x"), Done("x", "stop")]),
        # A held-back start that turns out not to be one is released with the next run.
        (["abc"], ["xa", "bx"], [Token(0, "x"), Token(1, "abx"), Done("xabx", "length")]),
    ],
)
def test_runs_of_characters_finish_where_one_at_a_time_would(stop, runs, want):
    """The decode thread pushes several characters per row at once; the text and its end
    are those of pushing them one by one."""
    gen = _gen(stop=stop, max_new=4)
    assert [e for run in runs for e in gen.push(run)] == want
    one_by_one = _gen(stop=stop, max_new=4)
    events = [e for run in runs for ch in run for e in one_by_one.push(ch)]
    assert _tokens(events) == _tokens(want)
    assert [e for e in events if isinstance(e, Done)] == [e for e in want if isinstance(e, Done)]


def test_backlog_counts_characters_not_events():
    async def run() -> None:
        gen = _gen(backlog=16, max_new=1000)
        gen.deliver(gen.push("a" * 10))
        assert gen.next_event_nowait() == Token(0, "a" * 10) and gen.queued == 0
        gen.deliver(gen.push("b" * 10))  # 10 unread: fine
        assert not gen.cancelled and gen.queued == 10
        gen.deliver(gen.push("c" * 10))  # 20 unread: over the backlog
        assert gen.cancelled and gen.queued == 0
        final = await gen.next_event()
        assert isinstance(final, Failed) and final.type == "slow_client"
        assert gen.next_event_nowait() is None

    asyncio.run(run())


def test_slow_client_is_cut_off_with_a_final_event():
    async def run() -> None:
        gen = _gen(backlog=16, max_new=1000)
        for _ in range(40):
            gen.deliver(gen.push("a"))
        assert gen.finished and gen.cancelled and gen.closed
        events = []
        while not gen.events.empty():
            events.append(gen.events.get_nowait())
        assert len(events) == 1 and isinstance(events[0], Failed)
        assert events[0].type == "slow_client"

    asyncio.run(run())


@pytest.fixture(scope="module")
def backend() -> ModelBackend:
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab, seed=4)
    return ModelBackend(Checkpoint(model, vocab), torch.device("cpu"), cache_size=4)


@pytest.fixture(scope="module")
def int8_backend() -> ModelBackend:
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab, seed=4)
    return ModelBackend(Checkpoint(model, vocab), torch.device("cpu"), weights="int8")


async def _collect(gen: Generation) -> Done | Failed:
    while True:
        event = await gen.next_event()
        if isinstance(event, Done | Failed):
            return event


def _until_stop(text: str, stop: list[str]) -> Done:
    """The final event for ``text`` generated in full: cut where a stop string first ends."""
    for end in range(1, len(text) + 1):
        for s in stop:
            if text[:end].endswith(s):
                return Done(text[: end - len(s)], "stop")
    return Done(text, "length")


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_batched_rows_equal_the_reference_sampler(weights, request):
    """Rows that join and leave a batch, some ending on a stop string part-way through a
    call of several steps (int8 with the native kernels), each get the text of decoding
    alone with ``charrnn.generate``."""
    backend = request.getfixturevalue("backend" if weights == "fp32" else "int8_backend")
    steps: list[int] = []
    advance = backend.advance

    def counting(batch, positions, on_sampled, n=1, early=False):
        steps.append(n)
        return advance(batch, positions, on_sampled, n, early)

    async def run() -> None:
        sched = Scheduler("t", backend, Metrics(), max_concurrent=8, max_queue=8)
        sched.start()
        gens = [
            _gen(
                prime="Alice"[: 1 + i % 5],
                max_new=20 + 7 * i,
                temperature=0.5 + i / 8,
                top_k=None if i % 2 else 3 + i,
                top_p=1.0 if i % 3 else 0.8,
                seed=100 + i,
                stop=["e", "o"] if i % 2 else [],
            )
            for i in range(12)
        ]  # more than fit at once: some wait in the queue
        for g in gens:
            sched.submit(g)
        results = await asyncio.gather(*(_collect(g) for g in gens))
        await sched.close()
        for g, r in zip(gens, results, strict=True):
            want = generate(
                backend.model,
                backend.vocab,
                g.prime,
                g.max_new,
                SamplingParams(g.temperature, g.top_k, g.top_p, g.seed),
                decoder=backend.decoder,
            )
            assert r == _until_stop(want, g.stop)
        assert sum(r.finish_reason == "stop" for r in results) >= 2

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "advance", counting)
        asyncio.run(run())
    assert max(steps) > 1 if backend.multi_step else set(steps) == {1}


def test_several_steps_per_call_need_the_native_kernels():
    """Without the native kernels the backend steps one character per call; asking for more
    is a bug, not a silently different schedule."""
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab, seed=4)
    backend = ModelBackend(Checkpoint(model, vocab), torch.device("cpu"), native_kernels=False)
    assert not backend.multi_step
    batch, _ = backend.new_row("a", 1.0, None, 1.0, 0)
    with torch.inference_mode(), pytest.raises(ValueError, match="native kernels"):
        backend.advance(batch, np.zeros(1, dtype=np.uint64), lambda ids: None, 2)


def test_cancel_frees_the_row_and_capacity_is_enforced(backend):
    async def run() -> None:
        sched = Scheduler("t", backend, Metrics(), max_concurrent=1, max_queue=1)
        sched.start()
        a, b = _gen(max_new=10_000), _gen(max_new=10_000)
        sched.submit(a)
        sched.submit(b)
        with pytest.raises(Overloaded):
            sched.submit(_gen())
        await a.next_event()
        sched.cancel(a)
        for _ in range(200):
            if sched.rows == [b]:
                break
            await asyncio.sleep(0.01)
        assert sched.rows == [b] and not sched.waiting
        await sched.drain(0)
        assert isinstance(await _collect(b), Failed)
        await asyncio.sleep(0.05)
        with pytest.raises(ShuttingDown):
            sched.submit(_gen())
        await sched.close()

    asyncio.run(run())


def test_a_generation_being_primed_still_counts_against_capacity(backend, monkeypatch):
    """Found when primes got fast: a request arriving while the one ahead of it was being
    primed (out of the queue, not yet in the batch) saw a free slot."""
    priming, release = threading.Event(), threading.Event()
    new_row = backend.new_row

    def slow_new_row(*args: object) -> object:
        priming.set()
        release.wait(5)
        return new_row(*args)

    monkeypatch.setattr(backend, "new_row", slow_new_row)

    async def run() -> None:
        sched = Scheduler("t", backend, Metrics(), max_concurrent=1, max_queue=1)
        sched.start()
        a, b = sched.submit(_gen(max_new=5)), sched.submit(_gen(max_new=5))
        assert await asyncio.to_thread(priming.wait, 5)  # a is out of the queue, priming
        assert sched.load == 2
        with pytest.raises(Overloaded):
            sched.submit(_gen())
        release.set()
        results = [await _collect(g) for g in (a, b)]
        assert all(isinstance(r, Done) for r in results)
        await sched.close()

    asyncio.run(run())


def test_prime_cache_is_an_lru(backend):
    backend.clear_cache()
    for prime in ["a", "b", "c", "d", "a", "e"]:
        backend.prime(prime)
    assert list(backend._cache) == ["c", "d", "a", "e"]
    _, _, hit = backend.prime("a")
    assert hit


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_padded_step_equals_the_plain_step(backend, rows):
    """The bucketed, padded computation that CUDA graphs capture gives the same rows."""
    from app.graphs import PaddedStep, bucket_for
    from charrnn.sampling import sample_next

    assert bucket_for(rows) >= rows
    torch.manual_seed(rows)
    v = len(backend.vocab)
    logits = torch.randn(rows, v)
    state = tuple(torch.randn(2, rows, 32) for _ in range(2))
    temperature, top_k = torch.rand(rows) + 0.5, torch.randint(1, v + 1, (rows,))
    top_p, u = torch.rand(rows) * 0.9 + 0.1, torch.rand(rows, dtype=torch.float64)
    padded = PaddedStep(backend.decoder, v, torch.device("cpu"), use_graphs=False)
    ids, new_logits, new_state = padded(logits, state, temperature, top_k, top_p, u)
    want_ids = sample_next(logits, temperature, top_k, top_p, u)
    want_logits, want_state = backend.decoder.step(want_ids, state)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(new_logits, want_logits)
    for a, b in zip(new_state, want_state, strict=True):
        torch.testing.assert_close(a, b)
