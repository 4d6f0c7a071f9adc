"""A soak of mixed traffic against a real server: JSON generation, SSE streams that hang up
part-way, OpenAI completions (echo, logprobs, streamed), /score, and hostile inputs, from many
concurrent clients, for a fixed time. Every option is drawn per request, so the server's
batches mix them all.

It fails (exit 1, one line per problem) on any 5xx, on any stream read to its end that ends
without a `done` event (an `error` event included: the streamed requests are well-formed) or
an OpenAI stream without `[DONE]`, on a hostile input
answered with anything but a 4xx, and on the server's memory growing over the last third of
the run. It prints its figures as JSON: requests by route and status, streams by how they
ended, the server's resident memory.

usage: python scripts/soak.py [--seconds 60] [--clients 24] [--model models/alice.pt]
       [--url URL --pid PID]   (an already running server; its memory is read through PID)

Without --url it starts `python -m app` on a free loopback port (one torch thread) and stops
it at the end. Clients talk only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server import run_server  # noqa: E402  (the test suite's way to start a server)

PRIMES = (
    "Alice",
    "The Queen",
    "\n",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
    "having nothing to do: once or twice she had peeped into the book her sister was reading",
)
REGEXES = ("[a-z ]{1,30}", "(Alice|Queen) [a-z]+", "[A-Z][a-z]+[.!?]")
# Requests a server must refuse with a 4xx: (method, path, body or query, content type).
HOSTILE: tuple[tuple[str, str, object, str], ...] = (
    ("POST", "/generate", {"prime": "Ω☃ café"}, "json"),
    ("POST", "/generate", {"prime": ""}, "json"),
    ("POST", "/generate", {"prime": "Alice", "max_new_chars": -5}, "json"),
    ("POST", "/generate", {"prime": "Alice", "temperature": "hot"}, "json"),
    ("POST", "/generate", {"prime": "Alice", "top_k": 10**30}, "json"),
    ("POST", "/generate", {"prime": "Alice", "logprobs": 999}, "json"),
    ("POST", "/generate", {"prime": "Alice", "constraint": {"regex": "("}}, "json"),
    ("POST", "/generate", {"prime": "Alice", "stop": ["a"] * 50}, "json"),
    ("POST", "/generate", {"prime": "Alice", "model": "nope"}, "json"),
    ("POST", "/generate", {"prime": "Alice", "surprise": 1}, "json"),
    ("POST", "/generate", b'{"prime": "Alice",', "raw"),
    ("POST", "/generate", b"\xff\xfe not json", "raw"),
    ("POST", "/generate/stream", {"prime": "Alice", "top_p": 0}, "json"),
    ("GET", "/generate/stream", {"prime": "Alice", "max_new_chars": "many"}, "query"),
    ("POST", "/score", {"text": "Alice", "top_logprobs": -1}, "json"),
    ("POST", "/v1/completions", {"model": "alice", "prompt": "A", "logprobs": 50}, "json"),
    ("POST", "/v1/completions", {"model": "alice", "prompt": "A", "suffix": "x"}, "json"),
    ("POST", "/v1/completions", {"model": "alice", "prompt": [[10**9]]}, "json"),
)


class Tally:
    def __init__(self) -> None:
        self.status: dict[str, collections.Counter[int]] = collections.defaultdict(
            collections.Counter
        )
        self.streams: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []

    def answered(self, route: str, status: int, detail: str = "") -> None:
        self.status[route][status] += 1
        if status >= 500:
            self.problems.append(f"{route} answered {status}: {detail[:200]}")

    def problem(self, line: str) -> None:
        self.problems.append(line)


CONTROLS: tuple[dict[str, object], ...] = (
    {"n": 3},
    {"banned_strings": ["the", "e "], "presence_penalty": 0.3},
    {"dry_multiplier": 0.8, "min_p": 0.05},
    {"max_copy_chars": 8},
    {"novel_lines": True, "stop": ["\n"]},  # a stop that cuts lines would be a 422
)


def _sampling(rng: random.Random) -> dict[str, object]:
    body: dict[str, object] = {"seed": rng.randrange(2**32)}
    body["temperature"] = rng.choice((0.0, 0.6, 1.0, 1.2))
    if rng.random() < 0.3:
        body["top_k"] = rng.randint(1, 20)
    if rng.random() < 0.3:
        body["top_p"] = rng.choice((0.5, 0.9))
    if rng.random() < 0.3:
        body["stop"] = rng.sample(["the", ".", "\n", "ice"], 2)
    return body


def native_body(rng: random.Random) -> dict[str, object]:
    body = _sampling(rng) | {
        "prime": rng.choice(PRIMES),
        "max_new_chars": rng.choice((1, 40, 200, 600)),
    }
    logprobs = rng.choice((None, None, 0, 3))
    if logprobs is not None:
        body["logprobs"] = logprobs
    if rng.random() < 0.2:
        body["constraint"] = {"regex": rng.choice(REGEXES)}
    if rng.random() < 0.2:  # many samples, generation controls, the copy guard
        body |= rng.choice(CONTROLS)
    return body


async def json_generate(c: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    r = await c.post("/generate", json=native_body(rng))
    t.answered("/generate", r.status_code, r.text)


async def sse_stream(c: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    hang_up = rng.choice((None, None, 0, 5, 60))  # events read before hanging up
    async with aconnect_sse(c, "POST", "/generate/stream", json=native_body(rng)) as es:
        t.answered("/generate/stream", es.response.status_code)
        if es.response.status_code != 200:
            return
        last, seen = None, 0
        async for event in es.aiter_sse():
            last, seen = event.event, seen + 1
            if hang_up is not None and seen > hang_up:
                t.streams["hung up"] += 1
                return
    t.streams[last or "nothing"] += 1
    if last != "done":  # the traffic is well-formed: an error event is a failure too
        t.problem(f"a stream read to its end ended without done (last event: {last})")


async def openai(c: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    body = _sampling(rng) | {
        "model": "alice",
        "prompt": rng.choice(PRIMES),
        "max_tokens": rng.choice((0, 20, 150)),
    }
    body["echo"] = rng.random() < 0.4 or body["max_tokens"] == 0
    if rng.random() < 0.5:
        body["logprobs"] = rng.choice((0, 2))
    if rng.random() < 0.4:
        body["stream"] = True
        async with c.stream("POST", "/v1/completions", json=body) as r:
            t.answered("/v1/completions", r.status_code)
            if r.status_code == 200:
                last = None
                async for line in r.aiter_lines():
                    last = line or last
                t.streams["[DONE]" if last == "data: [DONE]" else "openai unterminated"] += 1
                if last != "data: [DONE]":
                    t.problem(f"an OpenAI stream ended without [DONE] (last: {last!r})")
        return
    r = await c.post("/v1/completions", json=body)
    t.answered("/v1/completions", r.status_code, r.text)


async def score(c: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    text = rng.choice(PRIMES[3:]) * rng.randint(1, 20)
    r = await c.post("/score", json={"text": text, "top_logprobs": rng.choice((0, 5))})
    t.answered("/score", r.status_code, r.text)


async def hostile(c: httpx.AsyncClient, rng: random.Random, t: Tally) -> None:
    method, path, body, kind = rng.choice(HOSTILE)
    if kind == "query":
        r = await c.request(method, path, params=body)  # type: ignore[arg-type]
    elif kind == "raw":
        r = await c.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )  # type: ignore[arg-type]
    else:
        r = await c.request(method, path, json=body)
    t.answered("hostile", r.status_code, r.text)
    if not 400 <= r.status_code < 500:
        t.problem(f"hostile {method} {path} {body!r:.80} answered {r.status_code}, not a 4xx")


KINDS = ((json_generate, 3), (sse_stream, 3), (openai, 3), (score, 1), (hostile, 2))


async def client(url: str, seed: int, until: float, t: Tally) -> None:
    rng = random.Random(seed)
    works, weights = zip(*KINDS, strict=True)
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.monotonic() < until:
            work = rng.choices(works, weights)[0]
            try:
                await work(c, rng, t)
            except httpx.HTTPError as exc:
                t.problem(f"{work.__name__}: {type(exc).__name__}: {exc}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def sample_memory(pid: int | None, until: float, out: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    while pid is not None and time.monotonic() < until:
        out.append((time.monotonic() - start, rss_mib(pid)))
        await asyncio.sleep(0.5)


def memory_figures(samples: list[tuple[float, float]], seconds: float) -> dict[str, float]:
    """Resident memory at the start of the last third and at the end (medians of a few
    seconds each, so one sample's noise does not count), and its growth between them."""
    if not samples:
        return {}
    third = [m for s, m in samples if 2 * seconds / 3 - 3 <= s <= 2 * seconds / 3]
    end = [m for s, m in samples if s >= seconds - 3]
    at_third, at_end = statistics.median(third or [samples[0][1]]), statistics.median(end)
    return {
        "start": round(samples[0][1], 1),
        "last_third_start": round(at_third, 1),
        "end": round(at_end, 1),
        "max": round(max(m for _, m in samples), 1),
        "last_third_growth": round(at_end - at_third, 1),
    }


async def soak(url: str, pid: int | None, seconds: float, clients: int) -> dict[str, object]:
    t, memory = Tally(), []
    until = time.monotonic() + seconds
    await asyncio.gather(
        sample_memory(pid, until, memory),
        *(client(url, 1000 + i, until, t) for i in range(clients)),
    )
    return {
        "seconds": seconds,
        "clients": clients,
        "requests": sum(sum(c.values()) for c in t.status.values()),
        "by_route": {route: dict(sorted(c.items())) for route, c in sorted(t.status.items())},
        "streams": dict(t.streams),
        "rss_mib": memory_figures(memory, seconds),
        "problems": t.problems[:20],
        "problem_count": len(t.problems),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "alice.pt")
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for its memory")
    ap.add_argument(
        "--max-growth-mib",
        type=float,
        default=16,
        help="most the server's memory may grow over the last third (MiB)",
    )
    args = ap.parse_args()
    if args.url:
        figures = asyncio.run(soak(args.url, args.pid, args.seconds, args.clients))
    else:
        with (
            tempfile.TemporaryDirectory() as tmp,
            run_server(Path(tmp), f"alice={args.model}", log_level="warning") as server,
        ):
            figures = asyncio.run(soak(server.url, server.proc.pid, args.seconds, args.clients))
            if figures["problem_count"]:  # the server's side of them
                print(server.log(), file=sys.stderr)
    growth = figures["rss_mib"].get("last_third_growth", 0.0)  # type: ignore[union-attr]
    if growth > args.max_growth_mib:
        figures["problems"].append(  # type: ignore[union-attr]
            f"the server's memory grew {growth} MiB over the last third"
        )
        figures["problem_count"] += 1  # type: ignore[operator]
    print(json.dumps(figures, indent=2))
    if figures["problem_count"]:
        for line in figures["problems"]:  # type: ignore[union-attr]
            print(f"soak: {line}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
