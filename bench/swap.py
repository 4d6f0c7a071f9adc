"""A model swapped at run time under running streams: the running streams' largest gap while
the new checkpoint loads, warms up and takes over, against the same streams' largest gap over
as long a time just before it (the base, in the same run).

16 SSE streams of the shipped model run; the swap (``PUT /admin/models/bench``) loads a copy
of it with its weights nudged (another sha256). Target: the gap during the swap <= 100 ms.

``python -m bench.swap`` prints one JSON object."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common import DEFAULT_MODEL, emit, largest_gap, machine, served, stream_tokens
from charrnn.checkpoint import load_checkpoint, save_checkpoint

STREAMS = 16
KEY = "bench-admin"
TARGET_MS = 100


def _models(folder: Path, checkpoint: Path) -> None:
    """``a.pt``, the checkpoint; ``b.pt``, the same network nudged (another sha256)."""
    shutil.copy(checkpoint, folder / "a.pt")
    ckpt = load_checkpoint(checkpoint)
    with torch.no_grad():
        ckpt.model.head.bias.add_(1e-3)
    save_checkpoint(folder / "b.pt", ckpt.model, ckpt.vocab, ckpt.meta)


async def _swap_under_streams(url: str) -> dict[str, float]:
    arrivals: list[list[float]] = [[] for _ in range(STREAMS)]
    body = {"prime": "Alice was ", "max_new_chars": 9000, "top_k": 5}
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=50)) as c:
        streams = [
            asyncio.ensure_future(stream_tokens(c, url, {**body, "seed": i}, arrivals[i]))
            for i in range(STREAMS)
        ]
        await asyncio.sleep(1.0)  # every stream under way
        asked = time.perf_counter()
        r = await c.put(
            f"{url}/admin/models/bench",
            json={"path": "b.pt"},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        r.raise_for_status()
        done = time.perf_counter()
        await asyncio.sleep(0.3)
        after = time.perf_counter()
        for s in streams:
            s.cancel()
        await asyncio.gather(*streams, return_exceptions=True)
    span = after - asked
    during = max(largest_gap(a, asked, after)[0] for a in arrivals)
    before = max(largest_gap(a, asked - span, asked)[0] for a in arrivals)
    return {
        "swap_s": round(done - asked, 3),
        "largest_gap_during_swap_ms": round(during * 1e3, 1),
        "largest_gap_before_swap_ms": round(before * 1e3, 1),
    }


def run(checkpoint: Path = DEFAULT_MODEL, port: int = 8769) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="charrnn-swap-") as tmp:
        folder = Path(tmp)
        _models(folder, checkpoint)
        with served(folder / "a.pt", port, admin_keys=KEY, model_dir=str(folder)) as url:
            figures = asyncio.run(_swap_under_streams(url))
    return {
        "benchmark": "swap",
        "streams": STREAMS,
        "target_ms": TARGET_MS,
        **figures,
        "machine": machine(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--port", type=int, default=8769)
    args = p.parse_args()
    emit(run(args.checkpoint, args.port))


if __name__ == "__main__":
    main()
