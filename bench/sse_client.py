"""A load client for ``bench/concurrency.py``, run as its own process: N SSE streams at once
over raw asyncio sockets, each token event counted in the bytes as they arrive.

It imports nothing heavy (no torch, no httpx) and parses nothing: on two cores the client
shares the machine with the server, and a client that decoded every event would measure
itself. Protocol on stdin/stdout: it prints ``ready`` once started, waits for a line on
stdin, runs every stream, then prints one JSON line: per stream its start, first
and last token times (``time.perf_counter``, the same monotonic clock in every process on
Linux) and its token count.

``python -m bench.sse_client --port P --bodies '[{...}, ...]'``"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

TOKEN = b"event: token"
END = (b"event: done", b"event: error")


async def stream(port: int, body: dict) -> dict[str, float | int]:
    """One ``POST /generate/stream`` read to its final event."""
    payload = json.dumps(body).encode()
    head = (
        f"POST /generate/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + payload)
    tokens, first, last, tail = 0, 0.0, 0.0, b""
    try:
        while chunk := await reader.read(1 << 16):
            now = time.perf_counter()
            data = tail + chunk
            n = data.count(TOKEN)
            if n:
                tokens += n
                first = first or now
                last = now
            # Enough to find a pattern split across two reads, too little to count one twice.
            tail = data[-(len(TOKEN) - 1) :]
            if any(end in data for end in END):
                break
    finally:
        writer.close()
    return {"start": t0, "first": first, "last": last, "tokens": tokens}


async def run(port: int, bodies: list[dict]) -> list[dict[str, float | int]]:
    return await asyncio.gather(*(stream(port, b) for b in bodies))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bodies", required=True, help="a JSON list of request bodies")
    args = p.parse_args()
    bodies = json.loads(args.bodies)
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps(asyncio.run(run(args.port, bodies))), flush=True)


if __name__ == "__main__":
    main()
