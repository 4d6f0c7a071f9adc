"""What generation controls and many samples cost, in the same run as their base.

- The decode alone: µs per character of the shipped model (``models/alice.pt``, int8, the
  native multi-step decode in calls of 16 characters, as the service runs it) for one row
  and for 64 rows, without controls and with presence and frequency penalties, DRY and two
  banned strings on every row, timed in turns; and the native sampler alone both ways.
- Over real HTTP (a served model, SSE): one stream with those controls against the same
  stream without (chars/s, in turns); 64 streams, half with them, against 64 plain ones
  (aggregate chars/s, and the running streams' largest gap); and ``n: 8`` from one request
  against ``n: 1``: characters per second in all, from each request's first character to its
  last (the decode alone), and as a client sees the request, from sending it to its last
  character (its one warm-up included), with primes of ~87 and ~340 characters.
- The copy guard (``max_copy_chars: 12``, with the shipped model's text index): the decode
  alone with it on every row against without, and one stream with it against the same stream
  without, over HTTP.

Targets: with controls >= 0.85x the characters per second without, at one stream and at 64;
the largest gap <= 50 ms; ``n: 8`` >= 4x ``n: 1``; one stream with the copy guard >= 0.8x.

``python -m bench.controls`` prints one JSON object."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.common import (
    DEFAULT_MODEL,
    emit,
    machine,
    served,
    stream_tokens,
    streams_at_once,
)
from charrnn.checkpoint import load_checkpoint
from charrnn.controls import Controls, ControlsBatch
from charrnn.decode import StepDecoder
from charrnn.sampling import SamplingBatch, SamplingParams
from charrnn.textindex import TextIndex, index_path
from charrnn.vocab import Vocabulary

BATCHES = (1, 64)
CALL_STEPS = 16  # characters per native decode call (bench/decode_step.py's CALL_STEPS)
CONTROLS = Controls(
    presence_penalty=0.3,
    frequency_penalty=0.2,
    dry_multiplier=0.8,
    banned_strings=("the ", "said"),
)
PRIME = "Alice was beginning to get very tired of sitting by her sister on the bank, and of"
TARGET = 0.85
GUARD = Controls(max_copy_chars=12)
GUARD_TARGET = 0.8


def _in_turns(a: Callable[[], object], b: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, timed alternately (a noisy machine slows both)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((a, times[0]), (b, times[1])):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def _batch(
    decoder: StepDecoder,
    vocab: Vocabulary,
    prime: list[int],
    b: int,
    reps: int,
    index: TextIndex,
) -> dict[str, object]:
    """One batch size's figures: ``b`` rows of one prime, their own seeds."""
    vocab_size = len(vocab)
    one_logits, one_state = decoder.prime(torch.tensor(prime))
    logits = one_logits.expand(b, -1).contiguous()
    state = tuple(s.repeat(1, b, 1) for s in one_state)
    sampling = SamplingBatch.of(
        [SamplingParams(1.0, None, 0.95, seed) for seed in range(b)], vocab_size, logits.device
    )
    controls = ControlsBatch.of(CONTROLS, vocab_size, prime, vocab.encode).repeat(b)
    guard = ControlsBatch.of(GUARD, vocab_size, prime, vocab.encode, index).repeat(b)
    at = np.zeros(b, dtype=np.uint64)

    def plain() -> None:
        decoder.decode_batch(logits, state, sampling, at, CALL_STEPS)
        at[:] += CALL_STEPS

    def controlled() -> None:
        decoder.decode_batch(logits, state, sampling, at, CALL_STEPS, controls=controls)

    def guarded() -> None:
        decoder.decode_batch(logits, state, sampling, at, CALL_STEPS, controls=guard)

    plain()
    controlled()
    guarded()
    t_plain, t_controls = _in_turns(plain, controlled, reps)
    t_base, t_guard = _in_turns(plain, guarded, reps)
    u = torch.rand(b, dtype=torch.float64)
    s_plain, s_controls = _in_turns(
        lambda: decoder.sample(logits, *sampling.filters, u),
        lambda: decoder.sample(logits, *sampling.filters, u, None, controls),
        reps * 10,
    )
    return {
        "batch": b,
        "plain_us_per_char_step": round(t_plain / CALL_STEPS * 1e6, 1),
        "controls_us_per_char_step": round(t_controls / CALL_STEPS * 1e6, 1),
        "chars_per_s_ratio": round(t_plain / t_controls, 3),
        "plain_sample_us": round(s_plain * 1e6, 1),
        "controls_sample_us": round(s_controls * 1e6, 1),
        "meets_target": t_plain / t_controls >= TARGET,
        "copy_guard_us_per_char_step": round(t_guard / CALL_STEPS * 1e6, 1),
        "copy_guard_chars_per_s_ratio": round(t_base / t_guard, 3),
    }


# The same controls as a request's fields.
FIELDS = {
    "presence_penalty": 0.3,
    "frequency_penalty": 0.2,
    "dry_multiplier": 0.8,
    "banned_strings": ["the ", "said"],
}


def _body(seed: int, n: int, controls: bool, samples: int = 1) -> dict:
    body = {"prime": "Alice", "max_new_chars": n, "seed": seed, "top_k": 5}
    if samples > 1:
        body["n"] = samples
    return body | (FIELDS if controls else {})


async def _stream_rate(c: httpx.AsyncClient, url: str, body: dict) -> float:
    """One request's characters per second, all its samples together, from its first
    character to its last."""
    arrivals: list[float] = []
    await stream_tokens(c, url, body, arrivals)
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


async def _one_stream(url: str, reps: int, fields: dict = FIELDS) -> tuple[float, float]:
    """One stream without and with ``fields``, in turns: median chars/s of each."""
    rates: tuple[list[float], list[float]] = ([], [])
    async with httpx.AsyncClient(timeout=120) as c:
        for on in (False, True):
            await _stream_rate(c, url, _body(0, 200, False) | (fields if on else {}))  # warm
        for rep in range(reps):
            for on in (False, True):
                body = _body(rep, 2000, False) | (fields if on else {})
                rates[on].append(await _stream_rate(c, url, body))
    return statistics.median(rates[0]), statistics.median(rates[1])


async def _streams(url: str, with_controls: int, seed: int) -> tuple[float, float]:
    """64 streams at once, the first ``with_controls`` with the controls: aggregate chars/s
    and the largest gap within any stream."""
    return await streams_at_once(url, [_body(seed + i, 500, i < with_controls) for i in range(64)])


async def _samples(url: str, reps: int) -> tuple[float, float]:
    """``n: 1`` and ``n: 8`` of one request, in turns: median chars/s in all of each."""
    rates: tuple[list[float], list[float]] = ([], [])
    async with httpx.AsyncClient(timeout=120) as c:
        for rep in range(reps):
            for k, samples in enumerate((1, 8)):
                body = _body(rep, 1000, False, samples)
                rates[k].append(await _stream_rate(c, url, body))
    return statistics.median(rates[0]), statistics.median(rates[1])


async def _samples_whole(url: str, reps: int, copies: int) -> tuple[float, float]:
    """``n: 1`` and ``n: 8`` of one request as a client sees it, in turns: its characters
    (all samples) per second from sending it to its last character, with a prime of
    ``copies`` times PRIME that no request sent before (so each warms it up once) and 300
    characters per sample. Median of each."""
    rates: tuple[list[float], list[float]] = ([], [])
    async with httpx.AsyncClient(timeout=120) as c:
        for rep in range(reps):
            for k, samples in enumerate((1, 8)):
                prime = "abcdefghijklmnopqrstuvwxyz"[rep % 26] + "xy"[k] + " " + PRIME * copies
                body = {"prime": prime, "max_new_chars": 300, "seed": rep, "top_k": 5}
                body |= {"n": samples} if samples > 1 else {}
                arrivals: list[float] = []
                sent = time.perf_counter()
                await stream_tokens(c, url, body, arrivals)
                rates[k].append(len(arrivals) / (arrivals[-1] - sent))
    return statistics.median(rates[0]), statistics.median(rates[1])


def serve(checkpoint: Path = DEFAULT_MODEL, port: int = 8768, reps: int = 3) -> dict[str, float]:
    with served(checkpoint, port) as url:
        plain1, controls1 = asyncio.run(_one_stream(url, reps))
        plain64 = [asyncio.run(_streams(url, 0, 1000 * r)) for r in range(reps)]
        half64 = [asyncio.run(_streams(url, 32, 1000 * r)) for r in range(reps)]
        n1, n8 = asyncio.run(_samples(url, reps))
        whole = {c: asyncio.run(_samples_whole(url, 2 * reps + 1, c)) for c in (1, 4)}
        plain_copy, guarded = asyncio.run(_one_stream(url, reps, {"max_copy_chars": 12}))
    agg_plain = statistics.median(a for a, _ in plain64)
    agg_half = statistics.median(a for a, _ in half64)
    return {
        "one_stream_chars_per_s": round(plain1),
        "one_stream_controls_chars_per_s": round(controls1),
        "one_stream_controls_vs_base": round(controls1 / plain1, 3),
        "streams64_chars_per_s": round(agg_plain),
        "streams64_half_controls_chars_per_s": round(agg_half),
        "streams64_half_controls_vs_base": round(agg_half / agg_plain, 3),
        "streams64_half_controls_largest_gap_ms": round(
            statistics.median(g for _, g in half64) * 1e3, 1
        ),
        "n1_chars_per_s": round(n1),
        "n8_chars_per_s": round(n8),
        "n8_vs_n1": round(n8 / n1, 2),
        # The request as a client sees it, its one warm-up included (an ~87- and a
        # ~340-character prime that is not cached).
        **{
            f"request_prime{len(PRIME) * c + 3}_n{k}_chars_per_s": round(rate)
            for c, pair in whole.items()
            for k, rate in zip((1, 8), pair, strict=True)
        },
        **{
            f"request_prime{len(PRIME) * c + 3}_n8_vs_n1": round(pair[1] / pair[0], 2)
            for c, pair in whole.items()
        },
        "one_stream_copy_guard_chars_per_s": round(guarded),
        "one_stream_copy_guard_base_chars_per_s": round(plain_copy),
        "one_stream_copy_guard_vs_base": round(guarded / plain_copy, 3),
        "copy_guard_meets_target": guarded / plain_copy >= GUARD_TARGET,
    }


@torch.inference_mode()  # as the service's decode thread runs
def run(batches: tuple[int, ...] = BATCHES, reps: int = 30) -> dict[str, object]:
    ckpt = load_checkpoint(DEFAULT_MODEL)
    decoder = StepDecoder(ckpt.model, "int8")
    if not decoder.multi_step:
        raise SystemExit("bench.controls needs the native kernels (a C++ compiler)")
    prime = ckpt.vocab.encode(PRIME)
    index = TextIndex.load(index_path(DEFAULT_MODEL))
    return {
        "benchmark": "controls",
        "model": DEFAULT_MODEL.name,
        "weights": "int8",
        "steps_per_call": CALL_STEPS,
        "controls": "presence 0.3, frequency 0.2 (last 64), DRY 0.8 (last 1024, allowed 8), "
        "banned 'the ', 'said'",
        "target_ratio": TARGET,
        "copy_guard": "max_copy_chars 12",
        "rows": [_batch(decoder, ckpt.vocab, prime, b, reps, index) for b in batches],
        "serving": serve(),
        "machine": machine(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    emit(run(tuple(args.batches), args.reps))


if __name__ == "__main__":
    main()
