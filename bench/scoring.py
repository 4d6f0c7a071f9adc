"""Probabilities and scoring over real HTTP (``python -m app`` on a loopback port).

- ``POST /score`` of 100,000 characters: characters/s, against the same text's int8 prime
  pass alone in this process with the service's thread count (the work /score rides on);
- one SSE stream of 6,000 characters with ``logprobs: 5`` against the same stream (prime,
  seed) without, alternated, median of five each: the loss is what computing and sending
  each character's logprob and five alternatives costs;
- the same plain stream while a second stream in the batch asks for ``logprobs: 5`` (what
  a stream that did not ask pays for one that did);
- the largest gap between two characters of four running streams while a 100,000-character
  /score is worked through (scoring shares the scheduler's prime budget)."""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import httpx
import torch

from bench.common import CORPUS, DEFAULT_MODEL, emit, largest_gap, machine, served, stream_tokens
from charrnn.checkpoint import load_checkpoint
from charrnn.decode import StepDecoder

SCORE_CHARS = 100_000
STREAM_CHARS = 6000


def _text(chars: str, n: int) -> str:
    """``n`` characters in the model's vocabulary: the corpus where it is at hand, else
    letters and spaces."""
    if CORPUS.exists():
        text = "".join(c for c in CORPUS.read_text(encoding="utf-8") if c in chars)
        while len(text) < n:
            text += text
        return text[-n:]
    rng = random.Random(0)
    letters = [c for c in chars if c.isalpha() or c == " "] or list(chars)
    return "".join(rng.choice(letters) for _ in range(n))


def _prime_alone(checkpoint: Path, text: str, threads: int) -> float:
    """Characters/s of the int8 prime pass over ``text`` in this process."""
    ckpt = load_checkpoint(checkpoint)
    torch.set_num_threads(threads)
    decoder = StepDecoder(ckpt.model, "int8")
    ids = torch.tensor(ckpt.vocab.encode(text))
    decoder.prime(ids[:1000])  # warm-up
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        decoder.prime(ids)
        times.append(time.perf_counter() - t0)
    return len(text) / statistics.median(times)


async def _stream(
    client: httpx.AsyncClient, url: str, body: dict, arrivals: list[float] | None = None
) -> float:
    """Read one SSE stream; characters/s from its first token to its end."""
    arrivals = [] if arrivals is None else arrivals
    await stream_tokens(client, url, body, arrivals)
    return (len(arrivals) - 1) / max(arrivals[-1] - arrivals[0], 1e-9)


async def measure(url: str, text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with httpx.AsyncClient(timeout=600) as c:
        # /score of 100,000 characters, alone.
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = await c.post(f"{url}/score", json={"text": text})
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
        out["score_chars_per_s"] = round(len(text) / statistics.median(times))
        out["score_nll"] = round(r.json()["nll"], 4)

        # One stream with and without logprobs: 5, alternated.
        body = {"prime": "Alice", "max_new_chars": STREAM_CHARS, "seed": 7}
        plain, with_lp = [], []
        for _ in range(5):
            plain.append(await _stream(c, url, body))
            with_lp.append(await _stream(c, url, {**body, "logprobs": 5}))
        out["one_stream_chars_per_s"] = round(statistics.median(plain))
        out["one_stream_logprobs5_chars_per_s"] = round(statistics.median(with_lp))
        out["logprobs5_loss"] = round(
            1 - out["one_stream_logprobs5_chars_per_s"] / out["one_stream_chars_per_s"], 3
        )

        # A plain stream next to one that asks for logprobs, against next to a plain one.
        def pair(second: dict) -> asyncio.Future[list[float]]:
            return asyncio.gather(
                _stream(c, url, body), _stream(c, url, {**body, "seed": 8, **second})
            )

        beside_plain, beside_lp = [], []
        for _ in range(3):
            beside_plain.append((await pair({}))[0])
            beside_lp.append((await pair({"logprobs": 5}))[0])
        out["plain_stream_beside_plain_chars_per_s"] = round(statistics.median(beside_plain))
        out["plain_stream_beside_logprobs5_chars_per_s"] = round(statistics.median(beside_lp))

        # Four running streams while 100,000 characters are scored.
        running: list[list[float]] = [[] for _ in range(4)]
        streams = [
            asyncio.create_task(
                _stream(c, url, {**body, "max_new_chars": 10000, "seed": i}, running[i])
            )
            for i in range(4)
        ]
        while min(len(a) for a in running) < 200:
            await asyncio.sleep(0.01)
        baseline_start = time.perf_counter()
        await asyncio.sleep(1.0)
        baseline_gap = max(largest_gap(a, baseline_start, time.perf_counter())[0] for a in running)
        t0 = time.perf_counter()
        (await c.post(f"{url}/score", json={"text": text})).raise_for_status()
        t1 = time.perf_counter()
        out["score_beside_4_streams_s"] = round(t1 - t0, 2)
        out["running_largest_gap_ms_while_scoring"] = round(
            max(largest_gap(a, t0, t1)[0] for a in running) * 1e3, 1
        )
        out["running_largest_gap_ms_before"] = round(baseline_gap * 1e3, 1)
        for s in streams:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    return out


def run(checkpoint: Path = DEFAULT_MODEL, port: int = 8767) -> dict[str, object]:
    chars = load_checkpoint(checkpoint).vocab.chars
    text = _text(chars, SCORE_CHARS)
    with served(checkpoint, port) as url:
        figures = asyncio.run(measure(url, text))
    from app.config import Settings

    alone = _prime_alone(checkpoint, text, Settings().threads)
    return {
        "benchmark": "scoring",
        "machine": machine(),
        "checkpoint": str(checkpoint),
        "score_chars": SCORE_CHARS,
        **figures,
        "int8_prime_alone_chars_per_s": round(alone),
        "score_vs_prime_alone": round(figures["score_chars_per_s"] / alone, 3),
        "score_target_chars_per_s": 20_000,
        "logprobs5_loss_target": 0.15,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--port", type=int, default=8767)
    args = p.parse_args()
    emit(run(args.checkpoint, args.port))


if __name__ == "__main__":
    main()
