"""Helpers shared by the benchmarks: timing, the baseline model, machine limits."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import torch

from charrnn.checkpoint import load_checkpoint
from charrnn.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "alice.pt"
# The seed corpus sits beside a developer's checkout; users' clones don't have it.
CORPUS = ROOT.parent / "shared" / "data" / "alice.txt"
# Alice's 75 characters, used when neither the corpus nor the model is at hand.
_FALLBACK_VOCAB = (
    "\n !(),-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz\u2018\u2019"
    "\u201c\u201d"
)


def vocabulary() -> Vocabulary:
    if DEFAULT_MODEL.exists():
        return load_checkpoint(DEFAULT_MODEL).vocab
    if CORPUS.exists():
        return Vocabulary.from_text(CORPUS.read_text(encoding="utf-8"))
    return Vocabulary.from_text(_FALLBACK_VOCAB)


def median_seconds(fn: Callable[[], object], reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, object]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def memory_bandwidth(device: torch.device, mib: int = 256) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical ceiling."""
    n = mib * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * n * 4 / median_seconds(copy, reps=5)


def peak_flops(device: torch.device, n: int = 2048) -> float:
    """FLOP/s of a large fp32 matmul, the practical compute ceiling."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def mm() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / median_seconds(mm, reps=5)


def peak_int8_ops(n: int = 2048) -> float:
    """Integer multiply-adds (x2) per second of a large int8 matmul on the CPU, the ceiling
    of the int8 decode step."""
    a = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, n), dtype=torch.int8)
    return 2 * n**3 / median_seconds(lambda: torch._int_mm(a, b.t()), reps=5)


def emit(result: dict[str, object]) -> None:
    print(json.dumps(result, indent=2))


@contextlib.contextmanager
def served(checkpoint: Path, port: int, root: Path = ROOT, **settings: str) -> Iterator[str]:
    """``python -m app`` of the checkout at ``root`` serving ``checkpoint`` on a loopback port,
    ready; yields its URL. ``settings`` are ``CHARRNN_*`` variables without the prefix."""
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "CHARRNN_MODELS": f"bench={checkpoint}",
        "CHARRNN_PORT": str(port),
        "CHARRNN_LOG_LEVEL": "warning",
        **{f"CHARRNN_{k.upper()}": v for k, v in settings.items()},
    }
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=root, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


SSE_TOKEN = b"event: token"


async def stream_tokens(
    client: httpx.AsyncClient, url: str, body: dict, arrivals: list[float]
) -> None:
    """Read one ``POST /generate/stream``, appending to ``arrivals`` the arrival time of every
    token event as it comes (one entry per token, so ``arrivals`` also counts them). Token
    events are counted in the raw bytes, not parsed: the client shares the cores with the
    server, and a heavy client would measure itself."""
    tail = b""
    async with client.stream("POST", f"{url}/generate/stream", json=body) as r:
        r.raise_for_status()
        async for chunk in r.aiter_raw():
            now = time.perf_counter()
            data = tail + chunk
            arrivals.extend([now] * data.count(SSE_TOKEN))
            tail = data[-(len(SSE_TOKEN) - 1) :]
            if b"event: done" in data or b"event: error" in data:
                return


def largest_gap(arrivals: list[float], start: float, end: float) -> tuple[float, float]:
    """The longest time without a token between ``start`` and ``end``, and when (from
    ``start``) it began."""
    inside = [t for t in arrivals if start <= t <= end]
    edges = [start, *inside, end]
    return max((b - a, a - start) for a, b in itertools.pairwise(edges))


async def streams_at_once(url: str, bodies: list[dict]) -> tuple[float, float]:
    """Every body streamed at once: aggregate chars/s (from the first request to the last
    token) and the largest gap within any stream (between its first and last character)."""
    arrivals: list[list[float]] = [[] for _ in bodies]
    limits = httpx.Limits(max_connections=len(bodies) + 36)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(stream_tokens(c, url, b, a) for b, a in zip(bodies, arrivals, strict=True))
        )
        elapsed = time.perf_counter() - t0
    gaps = [max(b - a for a, b in itertools.pairwise(s)) for s in arrivals if len(s) > 1]
    return sum(map(len, arrivals)) / elapsed, max(gaps)
