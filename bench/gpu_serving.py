"""The decode and serving checks of ``bench/gpu_check.sh``, over real HTTP: one server with
two models on one device, warmed up together.

Checks (each true or false in the JSON; the exit status is 1 if any is false):

* ``two_models_ready``: both models load, capture and warm up, and the server gets ready;
* ``every_bucket_captured``: each model logged CUDA graphs for every bucket of
  ``app.runner.graphs.bucket_plan(max_concurrent)`` (skipped, so true, off CUDA);
* ``same_text_alone_and_among_200``: one seeded request gives the same text alone and in the
  middle of 200 concurrent streams;
* ``streams256_all_complete``: 256 concurrent SSE streams all finish with every character;
  their aggregate chars/s is reported.

Runs on the CPU too (smaller by ``--scale``), which is how it is tested before a GPU is lent."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.runner.graphs import bucket_plan
from bench.common import DEFAULT_MODEL, ROOT, emit, machine


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> str:
    """The text of one SSE stream (its token events' data, JSON strings)."""
    import json

    text: list[str] = []
    async with client.stream("POST", f"{url}/generate/stream", json=body) as r:
        r.raise_for_status()
        event = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "token":
                text.append(json.loads(line[6:])["text"])
            elif event in ("done", "error") and line.startswith("data: "):
                break
    return "".join(text)


async def _checks(url: str, crowd: int, streams: int, length: int) -> dict[str, object]:
    limits = httpx.Limits(max_connections=streams + 16, max_keepalive_connections=streams + 16)
    async with httpx.AsyncClient(timeout=300, limits=limits) as c:
        body = {"model": "b", "prime": "Alice", "max_new_chars": length, "seed": 7, "top_k": 5}
        alone = await _stream(c, url, body)
        others = [
            {"model": "b", "prime": "The", "max_new_chars": length, "seed": i, "temperature": 0.8}
            for i in range(crowd)
        ]
        bodies = [*others[: crowd // 2], body, *others[crowd // 2 :]]
        texts = await asyncio.gather(*(_stream(c, url, b) for b in bodies))
        same = texts[crowd // 2] == alone and len(alone) == length
        many = [
            {"model": "a", "prime": "Alice", "max_new_chars": length, "seed": i, "top_k": 5}
            for i in range(streams)
        ]
        t0 = time.perf_counter()
        done = await asyncio.gather(*(_stream(c, url, b) for b in many))
        elapsed = time.perf_counter() - t0
    chars = sum(len(t) for t in done)
    return {
        "same_text_alone_and_among_200": same,
        "streams256_all_complete": chars == streams * length,
        "streams256_aggregate_chars_per_s": round(chars / elapsed),
        "streams256_seconds": round(elapsed, 2),
    }


def _captured(log: str, name: str) -> list[int] | None:
    m = re.search(rf"model {name}: CUDA graphs captured for \[([\d, ]*)\] rows", log)
    return [int(x) for x in m.group(1).split(",") if x.strip()] if m else None


def run(checkpoint: Path, port: int, scale: float) -> dict[str, object]:
    crowd, streams = max(2, int(200 * scale)), max(2, int(256 * scale))
    length = max(20, int(300 * scale))
    max_concurrent = max(streams, crowd + 1)
    env = {
        **os.environ,
        "CHARRNN_MODELS": f"a={checkpoint},b={checkpoint}",
        "CHARRNN_PORT": str(port),
        "CHARRNN_LOG_LEVEL": "info",
        "CHARRNN_MAX_CONCURRENT": str(max_concurrent),
        "CHARRNN_MAX_QUEUE": str(max_concurrent),
    }
    result: dict[str, object] = {"benchmark": "gpu_serving", "machine": machine()}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        ready = False
        try:
            while time.perf_counter() - t0 < 240 and proc.poll() is None:
                try:
                    if httpx.get(f"{url}/ready").status_code == 200:
                        ready = True
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            result["two_models_ready"] = ready
            result["ready_after_s"] = round(time.perf_counter() - t0, 1)
            if ready:
                info = httpx.get(f"{url}/info").json()["models"]
                result["decode_paths"] = {
                    m["name"]: [m["device"], m["decode_weights"], m["batch_invariant"]]
                    for m in info
                }
                result |= asyncio.run(_checks(url, crowd, streams, length))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            log.seek(0)
            text = log.read()
    cuda = "CUDA graphs captured" in text or any(
        v[0].startswith("cuda") for v in result.get("decode_paths", {}).values()
    )
    plan = bucket_plan(max_concurrent)
    captured = {name: _captured(text, name) for name in ("a", "b")}
    result["buckets_planned"] = plan
    result["buckets_captured"] = captured
    result["every_bucket_captured"] = (not cuda) or all(c == plan for c in captured.values())
    if not ready:
        result["server_log_tail"] = text[-3000:]
    checks = [
        "two_models_ready",
        "every_bucket_captured",
        "same_text_alone_and_among_200",
        "streams256_all_complete",
    ]
    result["failed"] = [c for c in checks if result.get(c) is not True]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of streams and length")
    args = p.parse_args()
    result = run(args.checkpoint, args.port, args.scale)
    emit(result)
    raise SystemExit(1 if result["failed"] else 0)


if __name__ == "__main__":
    main()
