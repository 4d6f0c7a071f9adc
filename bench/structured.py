"""Structured generation's cost, over real HTTP, base and constrained in the same run.

- One SSE stream under a regex against the same stream unconstrained (chars/s).
- 64 SSE streams, half of them under a regex, against 64 unconstrained streams: aggregate
  chars/s, and the running streams' largest gap between two characters.
- Compile time of each of the README's examples and of a 50-property JSON schema, from a
  cold cache, on the model's vocabulary with JSON's punctuation added (a prose model has no
  braces or quotes; the compile time depends on the grammar, not on which characters).
- llguidance's cost per row and character under the regex (a mask and a step), 32 rows
  through the decode thread's ``MaskStepper``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import httpx

from bench.common import (
    DEFAULT_MODEL,
    emit,
    machine,
    served,
    stream_tokens,
    streams_at_once,
)
from charrnn.checkpoint import load_checkpoint
from charrnn.structured import Constraint, MaskStepper, cache, compile_constraint, new_masks
from charrnn.vocab import Vocabulary

# Any character but the corpus's rarest (digits, brackets, the underscore and asterisk of its
# markup): the model puts almost no mass on them, so "end" is hardly ever drawn and a stream
# runs its whole length, while every character still goes through the mask. (A regex that
# leaves out the text's apostrophes or dashes ends most streams within a few dozen
# characters, which measures start-up, not the mask's cost.)
PROSE = r"[^0-9\[\]_*]+"
EXAMPLES = {
    "name_regex": {"regex": r"[A-Z][a-z]{3,9}(ia|or|wen)"},
    "template_regex": {"regex": r"Alice (said|cried|whispered) '[a-z ,]{10,60}'\."},
    "yes_no_choice": {"choice": ["yes", "no"]},
    "json_schema_50_properties": {
        "json_schema": {
            "type": "object",
            "properties": {
                f"p{i}": {"type": ["string", "integer", "boolean"][i % 3]} for i in range(50)
            },
            "required": [f"p{i}" for i in range(50)],
        }
    },
}


def _body(seed: int, n: int, constrained: bool) -> dict:
    body = {"prime": "Alice", "max_new_chars": n, "seed": seed, "top_k": 5}
    return body | ({"constraint": {"regex": PROSE}} if constrained else {})


async def _one_stream(url: str, constrained: bool, reps: int) -> float:
    rates = []
    async with httpx.AsyncClient(timeout=120) as c:
        await stream_tokens(c, url, _body(0, 100, constrained), [])  # warm
        for rep in range(reps):
            arrivals: list[float] = []
            await stream_tokens(c, url, _body(rep, 2000, constrained), arrivals)
            rates.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
    return statistics.median(rates)


async def _streams(url: str, constrained: int, seed: int) -> tuple[float, float]:
    """64 streams at once, the first ``constrained`` under the regex: aggregate chars/s and
    the largest gap within any stream."""
    return await streams_at_once(url, [_body(seed + i, 500, i < constrained) for i in range(64)])


def compile_ms(chars: str, reps: int = 5) -> dict[str, float]:
    vocab = Vocabulary.from_text(chars + '{}[]":,0123456789' + "'")
    out = {}
    for name, spec in EXAMPLES.items():
        constraint = Constraint.parse(spec)
        times = []
        for _ in range(reps):
            cache.clear()
            t0 = time.perf_counter()
            compile_constraint(vocab, constraint)
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1e3, 2)
    return out


def llguidance_us(vocab: Vocabulary, rows: int = 32, steps: int = 200) -> float:
    """llguidance's own cost, µs per row and character: a mask and a step of ``rows``
    matchers under the regex, through the decode thread's ``MaskStepper`` (best of 3)."""
    grammar = compile_constraint(vocab, Constraint.parse({"regex": PROSE}))
    text = vocab.encode("Alice was beginning to get very tired of sitting by her sister " * 4)
    text = text[:steps]
    best = float("inf")
    for _ in range(3):
        stepper = MaskStepper([(b, grammar.matcher()) for b in range(rows)], new_masks(rows, vocab))
        t0 = time.perf_counter()
        for i in text:
            stepper.fill()
            stepper.advance([i] * rows)
        best = min(best, time.perf_counter() - t0)
    return round(best / (rows * len(text)) * 1e6, 2)


def run(checkpoint: Path = DEFAULT_MODEL, port: int = 8767, reps: int = 3) -> dict[str, object]:
    chars = load_checkpoint(checkpoint).vocab.chars
    result: dict[str, object] = {"machine": machine()}
    with served(checkpoint, port) as url:
        base = asyncio.run(_one_stream(url, False, reps))
        constrained = asyncio.run(_one_stream(url, True, reps))
        plain64 = [asyncio.run(_streams(url, 0, 1000 * r)) for r in range(reps)]
        half64 = [asyncio.run(_streams(url, 32, 1000 * r)) for r in range(reps)]
    agg_plain = statistics.median(a for a, _ in plain64)
    agg_half = statistics.median(a for a, _ in half64)
    result |= {
        "one_stream_chars_per_s": round(base),
        "one_stream_regex_chars_per_s": round(constrained),
        "one_stream_regex_vs_base": round(constrained / base, 2),
        "streams64_chars_per_s": round(agg_plain),
        "streams64_half_regex_chars_per_s": round(agg_half),
        "streams64_half_regex_vs_base": round(agg_half / agg_plain, 2),
        "streams64_largest_gap_ms": round(statistics.median(g for _, g in plain64) * 1e3, 1),
        "streams64_half_regex_largest_gap_ms": round(
            statistics.median(g for _, g in half64) * 1e3, 1
        ),
        "compile_ms": compile_ms(chars),
        "llguidance_us_per_row_and_char": llguidance_us(Vocabulary(chars)),
    }
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--port", type=int, default=8767)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    emit(run(args.checkpoint, args.port, args.reps))


if __name__ == "__main__":
    main()
