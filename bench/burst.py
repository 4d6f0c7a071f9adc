"""A burst of long primes against running streams, over real HTTP.

Four SSE streams of 6,000 characters are running (read by a process of their own) when 32
requests arrive at once, each with a cold 4,090-character prime (different slices of a text);
one second into the burst a request with a 10-character prime arrives. Measured: the running
streams' largest gap between two characters while the burst is worked through, each burst
request's time to first character (the last of them is when the burst as a whole is
through), and the short prime's.

The baseline, in the same run, is the same burst against a server whose prime budget and
slice are unbounded (``CHARRNN_PRIME_BUDGET`` and ``CHARRNN_PRIME_SLICE_MS`` = 10⁹): every
prime then runs whole before the next decode call, which is how the scheduler worked before
primes were cut into parts."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import (
    CORPUS,
    DEFAULT_MODEL,
    ROOT,
    emit,
    largest_gap,
    machine,
    served,
    stream_tokens,
)
from charrnn.checkpoint import load_checkpoint

RUNNING, RUNNING_CHARS = 4, 6000
BURST, PRIME_CHARS = 32, 4090


def _texts(chars: str) -> str:
    """A long text in the model's vocabulary: the corpus where it is at hand, else letters."""
    if CORPUS.exists():
        text = "".join(c for c in CORPUS.read_text(encoding="utf-8") if c in chars)
        if len(text) > BURST * 200 + PRIME_CHARS:
            return text
    rng = random.Random(0)
    letters = [c for c in chars if c.isalpha() or c == " "] or list(chars)
    return "".join(rng.choice(letters) for _ in range(BURST * 200 + PRIME_CHARS))


async def _watch(url: str, seed: int) -> None:
    """The running streams, read in a process of their own (as their clients would be), so
    that sending the burst cannot delay their reads: prints ``ready`` once all are streaming,
    then, after a line on stdin, every stream's arrival times as JSON."""
    async with httpx.AsyncClient(timeout=300) as c:
        running: list[list[float]] = [[] for _ in range(RUNNING)]
        bodies = [
            {"prime": "Alice", "max_new_chars": RUNNING_CHARS, "seed": seed + i}
            for i in range(RUNNING)
        ]
        streams = [
            asyncio.create_task(stream_tokens(c, url, b, running[i])) for i, b in enumerate(bodies)
        ]
        while min(len(a) for a in running) < 200:
            await asyncio.sleep(0.01)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        print(json.dumps(running), flush=True)
        for stream in streams:
            stream.cancel()


async def burst(url: str, chars: str, seed: int) -> dict[str, float]:
    text = _texts(chars)
    # time.perf_counter is the system's monotonic clock: the watcher's times compare with ours.
    watcher = subprocess.Popen(
        [sys.executable, "-m", "bench.burst", "--watch", url, "--seed", str(seed)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdin is not None and watcher.stdout is not None
    assert (await asyncio.to_thread(watcher.stdout.readline)).strip() == "ready"
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        firsts: list[list[float]] = [[] for _ in range(BURST + 1)]
        t0 = time.perf_counter()
        offset = random.Random(seed).randrange(200)
        bodies = [
            {
                "prime": text[offset + i * 200 : offset + i * 200 + PRIME_CHARS],
                "max_new_chars": 1,
                "seed": i,
            }
            for i in range(BURST)
        ]
        burst = [
            asyncio.create_task(stream_tokens(c, url, b, firsts[i])) for i, b in enumerate(bodies)
        ]
        await asyncio.sleep(1.0)  # the burst is under way (it takes seconds): a short prime
        t_short = time.perf_counter()
        short = {"prime": text[offset : offset + 10], "max_new_chars": 1, "seed": 99}
        await stream_tokens(c, url, short, firsts[BURST])
        await asyncio.gather(*burst)
        watcher.stdin.write("stop\n")
        watcher.stdin.flush()
        running = json.loads(await asyncio.to_thread(watcher.stdout.readline))
        watcher.wait(timeout=30)
        end = max(f[0] for f in firsts[:BURST])
        gap, gap_at = max(largest_gap(a, t0, end) for a in running)
        ttfc = sorted(f[0] - t0 for f in firsts[:BURST])
        return {
            "running_largest_gap_ms": round(gap * 1e3, 1),
            "running_largest_gap_began_ms": round(gap_at * 1e3, 1),
            "burst_first_char_ms_min": round(ttfc[0] * 1e3, 1),
            "burst_first_char_ms_median": round(statistics.median(ttfc) * 1e3, 1),
            "burst_through_ms": round(ttfc[-1] * 1e3, 1),
            "short_prime_mid_burst_first_char_ms": round((firsts[BURST][0] - t_short) * 1e3, 1),
            "short_prime_sent_after_ms": round((t_short - t0) * 1e3, 1),
            # 1.0 when the short prime got its character before the burst was through.
            "short_prime_before_burst_end": float(firsts[BURST][0] < end),
        }


def run(checkpoint: Path = DEFAULT_MODEL, port: int = 8766, reps: int = 3) -> dict[str, object]:
    chars = load_checkpoint(checkpoint).vocab.chars
    figures: dict[str, list[dict[str, float]]] = {"chunked": [], "unbounded": []}
    for name, budget in (("unbounded", "1000000000"), ("chunked", "")):
        settings = {"prime_budget": budget, "prime_slice_ms": budget} if budget else {}
        with served(checkpoint, port, **settings) as url:
            for rep in range(reps):
                figures[name].append(asyncio.run(burst(url, chars, seed=rep * 10)))

    def median(name: str, key: str) -> float:
        return round(statistics.median(f[key] for f in figures[name]), 1)

    keys = figures["chunked"][0].keys()
    ours = {k: median("chunked", k) for k in keys}
    base = {k: median("unbounded", k) for k in keys}
    return {
        "benchmark": "burst",
        "machine": machine(),
        "checkpoint": str(checkpoint),
        "running_streams": RUNNING,
        "burst": f"{BURST} cold primes of {PRIME_CHARS} characters",
        **ours,
        "runs": figures["chunked"],
        "baseline_unbounded_prime_budget": base,
        "largest_gap_vs_baseline": round(
            ours["running_largest_gap_ms"] / base["running_largest_gap_ms"], 3
        ),
        "burst_through_vs_baseline": round(ours["burst_through_ms"] / base["burst_through_ms"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--watch", metavar="URL", help=argparse.SUPPRESS)  # the watcher process
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.watch:
        asyncio.run(_watch(args.watch, args.seed))
        return
    emit(run(args.checkpoint, args.port, args.reps))


if __name__ == "__main__":
    main()
