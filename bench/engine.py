"""The engine alone: long generations of the shipped model through the scheduler and the
decode thread, no HTTP, their characters per second in all. Separates the serving core's
cost from the HTTP layer's; run it in two checkouts to compare them.

``python -m bench.engine --rows 64 --seconds 5`` prints one JSON object."""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from app.config import Settings
from app.engine import Engine, GenerationRequest, TextRun
from app.metrics import Metrics
from bench.common import DEFAULT_MODEL, emit, machine
from charrnn.sampling import SamplingParams


async def rate(checkpoint: Path, rows: int, seconds: float, warm_s: float = 2.0) -> float:
    """Characters per second over ``seconds``, after ``warm_s``, with ``rows`` generations."""
    engine = Engine.load(Settings(models=f"bench={checkpoint}", threads=1), Metrics())
    await engine.warm_up()
    model = engine.models["bench"]
    requests = [
        GenerationRequest("Alice", 10**7, SamplingParams(1.0, 5, 1.0, i)) for i in range(rows)
    ]
    handles = [engine.submit(model, r) for r in requests]  # as older checkouts can
    count = 0

    async def read(handle) -> None:  # type: ignore[no-untyped-def]
        nonlocal count
        while True:
            for event in await handle.next():
                if isinstance(event, TextRun):
                    count += len(event.text)

    readers = [asyncio.ensure_future(read(h)) for h in handles]
    await asyncio.sleep(warm_s)
    start, t0 = count, time.perf_counter()
    await asyncio.sleep(seconds)
    chars_per_s = (count - start) / (time.perf_counter() - t0)
    for task in readers:
        task.cancel()
    await engine.drain(0)
    await engine.close()
    return chars_per_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    chars_per_s = asyncio.run(rate(args.checkpoint, args.rows, args.seconds))
    emit(
        {"benchmark": "engine", "rows": args.rows, "chars_per_s": round(chars_per_s)}
        | {"machine": machine()}
    )


if __name__ == "__main__":
    main()
