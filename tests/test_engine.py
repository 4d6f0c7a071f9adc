"""Unit tests of the scheduler, the decode thread and a generation's parts (no HTTP)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from app.engine import Done, Failed, GenerationRequest, Handle, Overloaded, ShuttingDown, TextRun
from app.engine.channel import EventChannel
from app.engine.outbox import FAILING_AFTER
from app.engine.scheduler import Scheduler
from app.engine.stops import StopMatcher
from app.metrics import Metrics
from app.runner import ModelRunner
from charrnn import SamplingParams, Vocabulary
from charrnn.checkpoint import Checkpoint
from charrnn.generate import generate
from tests.conftest import make_text, tiny_model


def _request(
    prime: str = "a",
    max_new: int = 100,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int = 0,
    stop: tuple[str, ...] = (),
) -> GenerationRequest:
    return GenerationRequest(prime, max_new, SamplingParams(temperature, top_k, top_p, seed), stop)


def _matcher(**kw) -> StopMatcher:
    return StopMatcher(_request(**kw))


def _tokens(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TextRun))


def test_stop_string_is_held_back_and_never_streamed():
    text = _matcher(stop=("abc",))
    assert _tokens(text.push("x") + text.push("a") + text.push("b")) == "x"  # "ab" may be "abc"
    assert _tokens(text.push("d")) == "abd"
    assert text.push("a") + text.push("b") == []
    events = text.push("c")
    assert events == [Done("xabd", "stop")] and text.finished


def test_length_finish_flushes_held_characters_and_indices_count_up():
    text = _matcher(stop=("zz",), max_new=3)
    events = text.push("a") + text.push("z") + text.push("y")
    assert events == [TextRun(0, "a"), TextRun(1, "zy"), Done("azy", "length")]


@pytest.mark.parametrize(
    ("stop", "runs", "want"),
    [
        # A run past the length limit: cut at the limit.
        ((), ["abcdef"], [TextRun(0, "abcd"), Done("abcd", "length")]),
        # A stop string inside a run: the text ends before it, the rest is dropped.
        (("cd",), ["abcdef"], [TextRun(0, "ab"), Done("ab", "stop")]),
        # A stop string across runs: its first characters were held back, never streamed.
        (("abc",), ["xa", "bcz"], [TextRun(0, "x"), Done("x", "stop")]),
        # A held-back start that turns out not to be one is released with the next run.
        (("abc",), ["xa", "bx"], [TextRun(0, "x"), TextRun(1, "abx"), Done("xabx", "length")]),
    ],
)
def test_runs_of_characters_finish_where_one_at_a_time_would(stop, runs, want):
    """The decode thread pushes several characters per row at once; the text and its end
    are those of pushing them one by one."""
    text = _matcher(stop=stop, max_new=4)
    assert [e for run in runs for e in text.push(run)] == want
    one_by_one = _matcher(stop=stop, max_new=4)
    events = [e for run in runs for ch in run for e in one_by_one.push(ch)]
    assert _tokens(events) == _tokens(want)
    assert [e for e in events if isinstance(e, Done)] == [e for e in want if isinstance(e, Done)]


def test_backlog_counts_characters_not_events():
    async def run() -> None:
        text, channel = _matcher(max_new=1000), EventChannel(backlog=16)
        assert channel.deliver(text.push("a" * 10))
        assert channel.get_nowait() == TextRun(0, "a" * 10) and channel.queued == 0
        assert channel.deliver(text.push("b" * 10))  # 10 unread: fine
        assert channel.queued == 10
        assert not channel.deliver(text.push("c" * 10))  # 20 unread: over the backlog
        assert channel.queued == 0 and channel.closed
        final = await channel.get()
        assert isinstance(final, Failed) and final.type == "slow_client"
        assert channel.get_nowait() is None

    asyncio.run(run())


def test_slow_client_is_cut_off_with_a_final_event():
    async def run() -> None:
        text, channel = _matcher(max_new=1000), EventChannel(backlog=16)
        delivered = [channel.deliver(text.push("a")) for _ in range(40)]
        assert delivered.count(False) == 1 and channel.cut_off.is_set() and channel.closed
        events = []
        while (event := channel.get_nowait()) is not None:
            events.append(event)
        assert len(events) == 1 and isinstance(events[0], Failed)
        assert events[0].type == "slow_client"

    asyncio.run(run())


@pytest.fixture(scope="module")
def backend() -> ModelRunner:
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab, seed=4)
    return ModelRunner(Checkpoint(model, vocab), torch.device("cpu"), cache_size=4)


@pytest.fixture(scope="module")
def int8_backend() -> ModelRunner:
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab, seed=4)
    return ModelRunner(Checkpoint(model, vocab), torch.device("cpu"), weights="int8")


def _scheduler(backend: ModelRunner, **kw: int) -> Scheduler:
    settings = {"max_concurrent": 8, "max_queue": 8, "prime_budget": 512, "prime_slice_s": 0.012}
    settings.update(kw)
    return Scheduler("t", backend, Metrics(), **settings)


async def _collect(handle: Handle) -> Done | Failed:
    async for event in handle.events():
        if isinstance(event, Done | Failed):
            return event
    raise AssertionError("no final event")


async def _until(condition, timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds (it peeks at the decode thread's state)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def _until_stop(text: str, stop: tuple[str, ...]) -> Done:
    """The final event for ``text`` generated in full: cut where a stop string first ends."""
    for end in range(1, len(text) + 1):
        for s in stop:
            if text[:end].endswith(s):
                return Done(text[: end - len(s)], "stop")
    return Done(text, "length")


def _reference(backend: ModelRunner, r: GenerationRequest) -> Done:
    text = generate(
        backend.model, backend.vocab, r.prime, r.max_new, r.sampling, decoder=backend.decoder
    )
    return _until_stop(text, r.stop)


PRIMES = make_text(8000, seed=9)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
@pytest.mark.parametrize("budget", [512, 7])
def test_batched_rows_equal_the_reference_sampler(weights, budget, request):
    """Rows that join and leave a batch, some ending on a stop string part-way through a
    call of several steps (int8 with the native kernels), their primes of 1 to 700
    characters worked through in parts (side by side as batched steps when several int8
    primes are in progress), each get the text of decoding alone with ``charrnn.generate``."""
    backend = request.getfixturevalue("backend" if weights == "fp32" else "int8_backend")
    backend.clear_cache()
    steps: list[int] = []
    decode, sample = backend.decode, backend.sample

    def counting(batch, positions, n):
        steps.append(n)
        return decode(batch, positions, n)

    def sampling(batch, positions):
        steps.append(1)
        return sample(batch, positions)

    requests = [
        _request(
            prime=PRIMES[i * 97 : i * 97 + (1 + i % 5 if i % 3 else 300 + 40 * i)],
            max_new=20 + 7 * i,
            temperature=0.5 + i / 8,
            top_k=None if i % 2 else 3 + i,
            top_p=1.0 if i % 3 else 0.8,
            seed=100 + i,
            stop=("e", "o") if i % 2 else (),
        )
        for i in range(24)
    ]  # more than fit at once: some wait in the queue

    async def run() -> list[Done | Failed]:
        sched = _scheduler(backend, max_concurrent=18, max_queue=8, prime_budget=budget)
        sched.start()
        gens = [sched.submit(r, backlog=10_000) for r in requests]
        results = await asyncio.gather(*(_collect(g) for g in gens))
        await sched.close()
        return results

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "decode", counting)
        mp.setattr(backend, "sample", sampling)
        results = asyncio.run(run())
    for r, got in zip(requests, results, strict=True):
        assert got == _reference(backend, r)
    assert sum(r.finish_reason == "stop" for r in results) >= 2
    assert max(steps) > 1 if backend.multi_step else set(steps) == {1}


def test_primes_side_by_side_equal_primes_one_by_one(int8_backend):
    """Batched steps over several primes at once (what a burst gets) leave exactly the
    logits and state of each prime run alone, wherever it was cut."""
    b = int8_backend
    ids = [b.encode(PRIMES[i * 50 : i * 50 + 40]) for i in range(9)]
    first = [b.prime(x[:13], None) for x in ids[:4]]  # four already under way
    starts = [f[1] for f in first] + [None] * 5
    done = [13] * 4 + [0] * 5
    window = torch.stack([x[d : d + 20] for x, d in zip(ids, done, strict=True)])
    with torch.inference_mode():
        logits, state = b.prime_batched(window, starts)
    for i, x in enumerate(ids):
        want_logits, want_state = b.prime(x[: done[i] + 20], None)
        assert torch.equal(logits[i : i + 1], want_logits), i
        for got, want in zip(state, want_state, strict=True):
            assert torch.equal(got[:, i : i + 1], want), i


def test_a_burst_of_long_primes_does_not_stall_running_rows(int8_backend, monkeypatch):
    """While long primes are worked through in parts, every iteration still advances the
    rows already streaming, and a short prime that arrives mid-burst joins the batch before
    the long ones finish."""
    calls: list[tuple[int, int]] = []  # (rows in the batch, primes in progress) per decode call
    decode, sample = int8_backend.decode, int8_backend.sample

    async def run() -> None:
        sched = _scheduler(int8_backend, max_concurrent=24, prime_budget=64)
        batcher = sched.loop

        def watching(batch, positions, n):
            calls.append((len(batch), len(batcher.priming)))
            return decode(batch, positions, n)

        def watching_sample(batch, positions):
            calls.append((len(batch), len(batcher.priming)))
            return sample(batch, positions)

        monkeypatch.setattr(int8_backend, "decode", watching)
        monkeypatch.setattr(int8_backend, "sample", watching_sample)
        sched.start()
        running = [sched.submit(_request(max_new=100_000, seed=i), 10**6) for i in range(2)]
        await _until(lambda: len(batcher.rows) == 2)
        long = [
            sched.submit(_request(prime=PRIMES[i * 300 : i * 300 + 1500]), 10**6) for i in range(9)
        ]
        await _until(lambda: len(batcher.priming) == 9)
        short = sched.submit(_request(prime="Alice", max_new=5), 10**6)
        assert isinstance(await _collect(short), Done)
        assert batcher.priming, "the short prime waited for the long ones"
        for g in long + running:
            g.cancel()
        await sched.close()

    asyncio.run(run())
    during = [rows for rows, priming in calls if priming]
    assert len(during) >= 5 and min(during) >= 2


@pytest.mark.parametrize("place", ["queued", "priming", "batch"])
def test_cancel_frees_the_place_wherever_the_request_is(int8_backend, monkeypatch, place):
    """A client that leaves frees its place at once for admission (429 counts only requests
    someone waits for), and the decode thread drops it from wherever it is: the queue, a
    prime in progress, or the batch."""
    backend = int8_backend
    backend.clear_cache()
    prime_part = backend.prime

    def slow_prime_part(ids, state):  # a prime of 2,000 characters takes ~1 s
        time.sleep(0.015)
        return prime_part(ids, state)

    monkeypatch.setattr(backend, "prime", slow_prime_part)

    async def run() -> None:
        sched = _scheduler(backend, max_concurrent=2, max_queue=1, prime_budget=32)
        batcher = sched.loop
        sched.start()
        in_batch = sched.submit(_request(max_new=100_000), 10**6)
        await _until(lambda: len(batcher.rows) == 1)
        priming = sched.submit(_request(prime=PRIMES[:2000]), 10**6)
        queued = sched.submit(_request(), 10**6)
        await _until(lambda: len(batcher.priming) == 1 and len(batcher.waiting) == 1)
        with pytest.raises(Overloaded):
            sched.submit(_request(), 10**6)
        gone = {"queued": queued, "priming": priming, "batch": in_batch}[place]
        gone.cancel()
        assert sched.live == 2
        again = sched.submit(_request(), 10**6)  # the freed place is taken at once
        gen = gone._gen
        where = {
            "queued": lambda: gen not in batcher.waiting,
            "priming": lambda: gen.key not in batcher.priming,
            "batch": lambda: gen.key not in batcher.rows,
        }[place]
        await _until(where, timeout=0.5)  # well before the prime is done
        assert batcher.priming or place == "priming"
        for g in (in_batch, priming, queued, again):
            g.cancel()
        await _until(lambda: not (batcher.rows or batcher.priming or batcher.waiting))
        await sched.drain(0)
        with pytest.raises(ShuttingDown):
            sched.submit(_request(), 10)
        await sched.close()

    asyncio.run(run())


def test_a_failing_unit_fails_only_its_generations(backend, monkeypatch):
    """An exception in a prime part fails that generation (an error event) and the loop goes
    on for the others; three failures in a row mark the model failing until one succeeds."""
    prime_part = backend.prime

    def faulty(ids, state):
        if int(ids[0]) == backend.vocab.encode("Q")[0]:
            raise RuntimeError("injected fault")
        return prime_part(ids, state)

    monkeypatch.setattr(backend, "prime", faulty)

    async def run() -> None:
        sched = _scheduler(backend)
        sched.start()
        bad = sched.submit(_request(prime="Queen"), 100)
        good = sched.submit(_request(prime="Alice", max_new=30), 100)
        failed, done = await _collect(bad), await _collect(good)
        assert isinstance(failed, Failed) and "injected fault" in failed.message
        assert isinstance(done, Done) and len(done.generated_text) == 30
        assert sched.failing is None
        for _ in range(FAILING_AFTER):
            assert isinstance(await _collect(sched.submit(_request(prime="Q"), 100)), Failed)
        assert sched.failing is not None and "injected fault" in sched.failing
        assert isinstance(await _collect(sched.submit(_request(prime="A"), 100)), Done)
        assert sched.failing is None
        await sched.close()

    asyncio.run(run())


def test_several_steps_per_call_need_the_native_kernels():
    """Without the native kernels the backend steps one character per call; asking for more
    is a bug, not a silently different schedule."""
    vocab = Vocabulary.from_text(make_text())
    model = tiny_model(vocab, seed=4)
    backend = ModelRunner(Checkpoint(model, vocab), torch.device("cpu"), native_kernels=False)
    assert not backend.multi_step
    logits, state = backend.prime(backend.encode("a"), None)
    batch = backend.new_row(logits, state, SamplingParams())
    with torch.inference_mode(), pytest.raises(ValueError, match="native kernels"):
        backend.decode(batch, np.zeros(1, dtype=np.uint64), 2)


def test_prime_cache_is_an_lru(backend):
    backend.clear_cache()
    for prime in ["a", "b", "c", "d", "a", "e"]:
        if backend.cached_prime(prime) is None:
            backend.cache_prime(prime, *backend.prime(backend.encode(prime), None))
    assert list(backend._cache) == ["c", "d", "a", "e"]
    assert backend.cached_prime("a") is not None and backend.cached_prime("b") is None


@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_padded_step_equals_the_plain_step(backend, rows):
    """The bucketed, padded computation that CUDA graphs capture gives the same rows."""
    from app.runner.graphs import PaddedStep, bucket_for
    from charrnn.sampling import SamplingBatch, sample_next

    assert bucket_for(rows) >= rows
    torch.manual_seed(rows)
    v = len(backend.vocab)
    logits = torch.randn(rows, v)
    state = tuple(torch.randn(2, rows, 32) for _ in range(2))
    temperature, top_k = torch.rand(rows) + 0.5, torch.randint(1, v + 1, (rows,))
    top_p, u = torch.rand(rows) * 0.9 + 0.1, torch.rand(rows, dtype=torch.float64)
    padded = PaddedStep(backend.decoder, v, torch.device("cpu"), use_graphs=False)
    sampling = SamplingBatch(temperature, top_k, top_p, np.zeros(rows, dtype=np.uint64))
    ids, new_logits, new_state = padded(logits, state, sampling, u)
    want_ids = sample_next(logits, temperature, top_k, top_p, u)
    want_logits, want_state = backend.decoder.step(want_ids, state)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(new_logits, want_logits)
    for a, b in zip(new_state, want_state, strict=True):
        torch.testing.assert_close(a, b)
