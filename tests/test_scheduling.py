"""The scheduler against a real server: long primes cannot freeze running streams, a client
that leaves frees its place wherever its request is, and a failing model fails only what it
touched (loopback only, bounded in count and time)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_text
from tests.server import ROOT, Server, free_port, run_server

pytestmark = pytest.mark.timeout(300)
SHIPPED = ROOT / "models" / "alice.pt"


def _scrape(server: Server, model: str) -> dict[str, float]:
    return server.metrics(
        "charrnn_active_generations",
        "charrnn_priming_generations",
        "charrnn_queue_depth",
        "charrnn_generated_characters_total",
        model=model,
    )


def _wait_idle(server: Server, model: str, timeout: float = 5.0) -> dict[str, float]:
    """Wait until nothing is queued, being primed or in the batch; the last scrape."""
    deadline = time.monotonic() + timeout
    while True:
        m = _scrape(server, model)
        busy = (
            m["charrnn_active_generations"]
            + m["charrnn_priming_generations"]
            + m["charrnn_queue_depth"]
        )
        if not busy:
            return m
        assert time.monotonic() < deadline, f"still busy after {timeout} s: {m}"
        time.sleep(0.02)


class Reader(threading.Thread):
    """Reads one SSE stream in the background, recording when each token arrived."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.arrivals: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        marker = b"event: token\n"
        tail = b""  # a marker may be split across two chunks: count it once, whole
        with (
            httpx.Client(timeout=60) as c,
            c.stream("POST", f"{self.url}/generate/stream", json=self.body) as r,
        ):
            for chunk in r.iter_raw():
                now = time.perf_counter()
                data = tail + chunk
                self.arrivals.extend([now] * data.count(marker))
                tail = data[-(len(marker) - 1) :]
                if self.stop.is_set() or b"event: done" in data:
                    return


@pytest.mark.e2e
@pytest.mark.slow
def test_a_burst_of_long_primes_keeps_running_streams_flowing(tmp_path):
    """The issue's scenario with the shipped model: 4 streams run when 32 requests with cold
    4,090-character primes arrive at once. While the burst's primes are worked through, the
    running streams keep receiving characters (in every quarter of that time), and a short
    prime sent mid-burst gets its character before the burst is through."""
    text = make_text(32 * 200 + 4096, seed=3)
    with run_server(tmp_path, f"alice={SHIPPED}") as server:
        running = [
            Reader(server.url, {"prime": "Alice", "max_new_chars": 10_000, "seed": i})
            for i in range(4)
        ]
        for r in running:
            r.start()
        deadline = time.monotonic() + 30
        while min(len(r.arrivals) for r in running) < 100:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        scrapes: list[tuple[float, float]] = []
        short_done: list[float] = []

        async def burst() -> None:
            async with httpx.AsyncClient(timeout=120) as c:

                async def one(prime: str) -> None:
                    r = await c.post(
                        f"{server.url}/generate", json={"prime": prime, "max_new_chars": 1}
                    )
                    assert r.status_code == 200, r.text

                primes = [text[i * 200 : i * 200 + 4090] for i in range(32)]
                tasks = [asyncio.create_task(one(prime)) for prime in primes]
                while not scrapes or scrapes[-1][1] == 0:  # the burst's primes are under way
                    await asyncio.sleep(0.01)
                await one("Alice was ")
                short_done.append(time.perf_counter())
                await asyncio.gather(*tasks)

        def watch(stop: threading.Event) -> None:
            while not stop.is_set():
                m = _scrape(server, "alice")
                scrapes.append((time.perf_counter(), m["charrnn_priming_generations"]))
                time.sleep(0.01)

        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(stop,), daemon=True)
        watcher.start()
        try:
            asyncio.run(burst())
        finally:
            stop.set()
            watcher.join()
            for r in running:
                r.stop.set()
        priming = [t for t, n in scrapes if n > 0]
        start, end = priming[0], priming[-1]
        assert len(priming) >= 8, f"the burst was primed in {len(priming)} scrapes"
        assert short_done[0] < end, "the short prime waited until the burst was through"
        quarter = (end - start) / 4
        for r in running:
            for q in range(4):
                lo, hi = start + q * quarter, start + (q + 1) * quarter
                assert any(lo <= t < hi for t in r.arrivals), (
                    f"a running stream got nothing in quarter {q + 1} of the burst"
                )


@pytest.mark.e2e
def test_whole_text_clients_that_give_up_free_their_place(tiny_checkpoint, tmp_path):
    """The issue's scenario: with the batch full (2) and the queue full (4) of clients that
    gave up after 0.5 s, the queue empties and the next request is accepted, not 429."""
    with run_server(
        tmp_path,
        f"tiny={tiny_checkpoint}",
        max_concurrent=2,
        max_queue=4,
        max_new_chars_limit=10_000_000,
    ) as server:
        running = [
            Reader(server.url, {"prime": "Alice", "max_new_chars": 10_000_000, "seed": i})
            for i in range(2)
        ]
        for r in running:
            r.start()
        deadline = time.monotonic() + 30
        while min(len(r.arrivals) for r in running) < 10:
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def give_up(seed: int) -> None:
            body = {"prime": "Alice", "max_new_chars": 50, "seed": seed}
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/generate", json=body, timeout=0.5)

        clients = [threading.Thread(target=give_up, args=(i,)) for i in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        deadline = time.monotonic() + 2
        while server.metric("charrnn_queue_depth", model="tiny"):
            assert time.monotonic() < deadline, "the queue kept clients that gave up"
            time.sleep(0.01)
        with httpx.stream(
            "POST", f"{server.url}/generate/stream", json={"prime": "A", "max_new_chars": 5}
        ) as r:
            assert r.status_code == 200  # queued behind the two streams, not refused
        for r in running:
            r.stop.set()


@pytest.mark.e2e
def test_streams_whose_clients_leave_before_the_body_free_their_place(tiny_checkpoint, tmp_path):
    """Clients that send a stream request and hang up at once: the request may be admitted
    before the server notices, and its response body may never start. Nothing keeps
    decoding for them."""
    with run_server(tmp_path, f"tiny={tiny_checkpoint}", max_new_chars_limit=10_000_000) as server:
        host, port = server.url.removeprefix("http://").split(":")
        body = json.dumps({"prime": "Alice", "max_new_chars": 10_000_000}).encode()
        request = (
            b"POST /generate/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        for _ in range(20):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(request)
        first = _wait_idle(server, "tiny")
        time.sleep(0.3)
        later = _scrape(server, "tiny")
        assert (
            later["charrnn_generated_characters_total"]
            == first["charrnn_generated_characters_total"]
        ), "characters are still being generated for clients that left"


@pytest.mark.e2e
def test_a_failing_model_fails_what_it_touched_and_turns_unready(tiny_checkpoint, tmp_path):
    fault = tmp_path / "fault"
    with run_server(
        tmp_path,
        f"tiny={tiny_checkpoint}",
        module="tests.faulty_app",
        env={"CHARRNN_TEST_FAULT_FILE": str(fault)},
    ) as server:
        # One generation's fault: its prime fails; a stream running beside it finishes.
        neighbour = Reader(server.url, {"prime": "Alice", "max_new_chars": 3000, "seed": 1})
        neighbour.start()
        r = httpx.post(f"{server.url}/generate", json={"prime": "Queen", "max_new_chars": 5})
        assert r.status_code == 500 and "injected prime fault" in r.json()["detail"]
        with httpx.stream(
            "POST", f"{server.url}/generate/stream", json={"prime": "Queen"}
        ) as stream:
            assert stream.status_code == 200
            raw = b"".join(stream.iter_raw())
        assert b"event: error" in raw and b"injected prime fault" in raw
        neighbour.join(30)
        assert len(neighbour.arrivals) == 3000
        assert httpx.get(f"{server.url}/ready").status_code == 200
        # A persistent fault: every decode call fails; after a few, the model is failing.
        fault.touch()
        for seed in range(3):
            r = httpx.post(f"{server.url}/generate", json={"prime": "Alice", "seed": seed})
            assert r.status_code == 500 and "injected decode fault" in r.json()["detail"]
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failing"
        assert "injected decode fault" in ready.json()["failing"]["tiny"]
        info = httpx.get(f"{server.url}/info").json()
        assert "injected decode fault" in info["models"][0]["decode_failing"]
        assert httpx.get(f"{server.url}/health").status_code == 200
        # The fault goes away: the next generation succeeds and the model is ready again.
        fault.unlink()
        r = httpx.post(f"{server.url}/generate", json={"prime": "Alice", "max_new_chars": 9})
        assert r.status_code == 200 and len(r.json()["generated_text"]) == 9
        assert httpx.get(f"{server.url}/ready").status_code == 200
        assert "Traceback" in server.log() and "injected decode fault" in server.log()


@pytest.mark.e2e
def test_a_failed_warm_up_exits_non_zero_with_one_line(tiny_checkpoint, tmp_path: Path):
    fault = tmp_path / "fault"
    fault.touch()
    env = {
        "PATH": "/usr/bin:/bin",
        "CHARRNN_MODELS": f"tiny={tiny_checkpoint}",
        "CHARRNN_PORT": str(free_port()),
        "CHARRNN_THREADS": "1",
        "CHARRNN_TEST_FAULT_FILE": str(fault),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.faulty_app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot start: warm-up of model tiny failed"), last
    assert "injected decode fault" in last


@pytest.mark.e2e
def test_a_long_prime_gives_the_same_text_alone_and_in_a_crowd_of_long_primes(
    tiny_checkpoint, tmp_path
):
    """Primes cut into parts, or run side by side with 20 others, leave exactly the state of
    one pass: a seeded request's text is the CLI's (one pass over its prime) whether it was
    alone or in a burst. No prime cache, so every prime is worked through."""
    from charrnn import SamplingParams, load_checkpoint
    from charrnn.decode import StepDecoder
    from charrnn.generate import generate

    text = make_text(21 * 150 + 3000, seed=5)
    target = {"prime": text[:3000], "max_new_chars": 300, "seed": 7, "top_k": 5}
    with run_server(
        tmp_path, f"tiny={tiny_checkpoint}", prime_cache_size=0, prime_budget=64
    ) as server:
        alone = httpx.post(f"{server.url}/generate", json=target, timeout=60).json()

        async def crowd() -> list[dict]:
            async with httpx.AsyncClient(timeout=120) as c:
                bodies = [
                    {"prime": text[i * 150 : i * 150 + 3000], "max_new_chars": 50, "seed": i}
                    for i in range(1, 21)
                ]
                rs = await asyncio.gather(
                    *(c.post(f"{server.url}/generate", json=b) for b in [target, *bodies])
                )
                return [r.json() for r in rs]

        among = asyncio.run(crowd())[0]
    ckpt = load_checkpoint(tiny_checkpoint)
    reference = generate(
        ckpt.model,
        ckpt.vocab,
        target["prime"],
        300,
        SamplingParams(top_k=5, seed=7),
        decoder=StepDecoder(ckpt.model, "int8"),
    )
    assert alone["generated_text"] == among["generated_text"] == reference
