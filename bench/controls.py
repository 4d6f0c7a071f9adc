"""What generation controls cost the decode: µs per character of the shipped model
(``models/alice.pt``, int8, the native multi-step decode in calls of 16 characters, as the
service runs it) for one row and for 64 rows, without controls and with presence and
frequency penalties, DRY and two banned strings on every row, timed in turns in the same run;
and the native sampler alone (one ``StepDecoder.sample`` of the batch) both ways. Target:
with controls >= 0.85x the characters per second without.

``python -m bench.controls`` prints one JSON object."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from bench.common import DEFAULT_MODEL, emit, machine
from charrnn.checkpoint import load_checkpoint
from charrnn.controls import Controls, ControlsBatch
from charrnn.decode import StepDecoder
from charrnn.sampling import SamplingBatch, SamplingParams
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
    decoder: StepDecoder, vocab: Vocabulary, prime: list[int], b: int, reps: int
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
    at = np.zeros(b, dtype=np.uint64)

    def plain() -> None:
        decoder.decode_batch(logits, state, sampling, at, CALL_STEPS)
        at[:] += CALL_STEPS

    def controlled() -> None:
        decoder.decode_batch(logits, state, sampling, at, CALL_STEPS, controls=controls)

    plain()
    controlled()
    t_plain, t_controls = _in_turns(plain, controlled, reps)
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
    }


@torch.inference_mode()  # as the service's decode thread runs
def run(batches: tuple[int, ...] = BATCHES, reps: int = 30) -> dict[str, object]:
    ckpt = load_checkpoint(DEFAULT_MODEL)
    decoder = StepDecoder(ckpt.model, "int8")
    if not decoder.multi_step:
        raise SystemExit("bench.controls needs the native kernels (a C++ compiler)")
    prime = ckpt.vocab.encode(PRIME)
    return {
        "benchmark": "controls",
        "model": DEFAULT_MODEL.name,
        "weights": "int8",
        "steps_per_call": CALL_STEPS,
        "controls": "presence 0.3, frequency 0.2 (last 64), DRY 0.8 (last 1024, allowed 8), "
        "banned 'the ', 'said'",
        "target_ratio": TARGET,
        "rows": [_batch(decoder, ckpt.vocab, prime, b, reps) for b in batches],
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
