"""Throughput at every concurrency, base against new in the same run.

N clients each stream from the shipped model with a prime from *Alice*, all at once, at
1, 2, 3, 4, 6, 8, 16, 32 and 64 concurrent streams: the aggregate SSE characters per second
(every stream's tokens over the time from the first request to the last token) and the
median stream's own rate (its tokens over its first to last token), with the ratios against
one stream.

"base" is the service as it was before the serving path was reworked for many streams: a
git worktree of ``--base-ref`` served from its own checkout, with its own defaults; "new" is
this checkout. Both servers run at once and take turns level by level, so a drift of the
machine's speed hits both alike. The clients are separate processes (``bench/sse_client.py``,
up to 32 streams each) that count token events in the raw bytes.

Every stream has at least ``MIN_CHARS`` characters: 9,600 / N, so that each level takes about
as long as the others at one stream's speed."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import DEFAULT_MODEL, ROOT, emit, machine, served

LEVELS = (1, 2, 3, 4, 6, 8, 16, 32, 64)
TOTAL_CHARS = 9600
MIN_CHARS = 1500
STREAMS_PER_CLIENT = 32
# The commit before the serving path's rework for many streams (issue #20, parts 3 and 4).
BASE_REF = "b09678e"
CLIENT = (sys.executable, "-m", "bench.sse_client")
PLOT = ROOT / "docs" / "concurrency.png"
# Targets against one stream (same run, shipped model).
TARGETS = {2: 1.8, 4: 2.5, 8: 3.0, 32: 4.0}
PRIMES = (
    "Alice was beginning to get very tired of sitting by her sister on the bank",
    "So she was considering in her own mind",
    "There was nothing so very remarkable in that",
    "Down, down, down. Would the fall never come to an end?",
    "The Queen turned crimson with fury, and",
    "Alice opened the door and found that it led into a small passage",
    "The Cat only grinned when it saw Alice.",
    "Soon her eye fell on a little glass box that was lying under the table",
)


def chars_per_stream(n: int) -> int:
    return max(MIN_CHARS, TOTAL_CHARS // n)


def bodies(n: int, rep: int) -> list[dict]:
    return [
        {
            "prime": PRIMES[(i + rep) % len(PRIMES)],
            "max_new_chars": chars_per_stream(n),
            "seed": 1000 * rep + i,
        }
        for i in range(n)
    ]


def server_pid(port: int) -> int | None:
    """The process id of this process's child serving ``port`` (None off Linux)."""
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == os.getpid() and f"CHARRNN_PORT={port}\0" in (
                    (entry / "environ").read_bytes().decode(errors="replace")
                ):
                    return int(entry.name)
    return None


def thread_cpu(pid: int | None) -> dict[str, float]:
    """CPU seconds so far of the server's event loop (its main thread) and of its other
    threads, the decode thread's (with torch's), from /proc ({} where it cannot be read)."""
    out: dict[str, float] = {}
    if pid is None:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                stat = (task / "stat").read_text()
                fields = stat.rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / tick
                kind = "event_loop" if task.name == str(pid) else "decode"
                out[kind] = out.get(kind, 0.0) + seconds
    return out


def level(port: int, n: int, rep: int) -> dict[str, float]:
    """One level: n streams at once, from ceil(n / 32) client processes started beforehand
    and released together. With the rates, the share of a core each of the server's threads
    was busy meanwhile (``busy_*``)."""
    all_bodies = bodies(n, rep)
    groups = [all_bodies[i : i + STREAMS_PER_CLIENT] for i in range(0, n, STREAMS_PER_CLIENT)]
    procs = [
        subprocess.Popen(
            [*CLIENT, "--port", str(port), "--bodies", json.dumps(g)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for g in groups
    ]
    pid = server_pid(port)
    try:
        for p in procs:
            if p.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError("a client process did not start")
        cpu0, t0 = thread_cpu(pid), time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        streams = [s for p in procs for s in json.loads(p.stdout.readline())]  # type: ignore[union-attr]
        cpu1, elapsed = thread_cpu(pid), time.perf_counter() - t0
    finally:
        for p in procs:
            p.wait(timeout=60)
    want = chars_per_stream(n)
    short = [s["tokens"] for s in streams if s["tokens"] != want]
    if short:
        raise RuntimeError(f"{len(short)} streams ended with other than {want} tokens: {short}")
    start = min(s["start"] for s in streams)
    end = max(s["last"] for s in streams)
    own = [s["tokens"] / (s["last"] - s["first"]) for s in streams]
    return {
        "aggregate": sum(s["tokens"] for s in streams) / (end - start),
        "per_stream": statistics.median(own),
        **{f"busy_{k}": (v - cpu0.get(k, 0.0)) / elapsed for k, v in cpu1.items()},
    }


@contextlib.contextmanager
def checkout(ref: str) -> Iterator[Path]:
    """A detached git worktree of ``ref``, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="charrnn-base-") as tmp:
        path = Path(tmp) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), ref],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False
            )


def summarise(runs: dict[int, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    agg = {n: statistics.median(r["aggregate"] for r in rs) for n, rs in runs.items()}
    own = {n: statistics.median(r["per_stream"] for r in rs) for n, rs in runs.items()}
    busy = {
        key: {str(n): round(statistics.median(r[key] for r in rs), 2) for n, rs in runs.items()}
        for key in runs[1][0]
        if key.startswith("busy_")
    }
    return {
        "aggregate_chars_per_s": {str(n): round(v) for n, v in agg.items()},
        "per_stream_chars_per_s": {str(n): round(v) for n, v in own.items()},
        "aggregate_vs_one_stream": {str(n): round(v / agg[1], 2) for n, v in agg.items()},
        **busy,
    }


def plot(result: dict, path: Path = PLOT) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name, style in (("base", "--"), ("new", "-")):
        if name not in result:
            continue
        figures = result[name]
        for key, label, marker in (
            ("aggregate_chars_per_s", "aggregate", "o"),
            ("per_stream_chars_per_s", "per stream", "."),
        ):
            xs = [int(n) for n in figures[key]]
            ax.plot(xs, list(figures[key].values()), style, marker=marker, label=f"{name}: {label}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(LEVELS), [str(n) for n in LEVELS])
    ax.set_xlabel("concurrent SSE streams")
    ax.set_ylabel("characters / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Shipped model, streams of {MIN_CHARS:,}-{TOTAL_CHARS:,} characters")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def targets(new: dict) -> dict[str, object]:
    ratios = new["aggregate_vs_one_stream"]
    return {
        "no_level_below_one_stream": min(ratios.values()) >= 1.0,
        **{f"streams{n}_at_least_{t}x": ratios[str(n)] >= t for n, t in TARGETS.items()},
    }


def run(
    checkpoint: Path = DEFAULT_MODEL,
    base_ref: str | None = BASE_REF,
    reps: int = 3,
    port: int = 8790,
    write_plot: bool = True,
) -> dict[str, object]:
    runs: dict[str, dict[int, list]] = {"new": {n: [] for n in LEVELS}}
    with contextlib.ExitStack() as stack:
        ports = {"new": port}
        if base_ref:
            root = stack.enter_context(checkout(base_ref))
            runs["base"] = {n: [] for n in LEVELS}
            ports["base"] = port + 1
            stack.enter_context(served(checkpoint, ports["base"], root=root))
        stack.enter_context(served(checkpoint, ports["new"]))
        for name in runs:
            level(ports[name], 4, reps)  # warm the servers' paths and the clients' imports
        for rep in range(reps):
            for n in LEVELS:
                for name in runs:
                    runs[name][n].append(level(ports[name], n, rep))
    result: dict[str, object] = {
        "benchmark": "concurrency",
        "machine": machine(),
        "checkpoint": str(checkpoint),
        "base_ref": base_ref,
        "chars_per_stream": {str(n): chars_per_stream(n) for n in LEVELS},
        "reps": reps,
        **{name: summarise(r) for name, r in runs.items()},
    }
    new = result["new"]
    assert isinstance(new, dict)
    result["targets"] = targets(new)
    if base_ref:
        base = result["base"]
        assert isinstance(base, dict)
        result["new_vs_base"] = {
            n: round(v / base["aggregate_chars_per_s"][n], 2)
            for n, v in new["aggregate_chars_per_s"].items()
        }
    if write_plot:
        plot(result)
    return result


def table(result: dict) -> str:
    """The markdown table of a run, base and new."""
    names = [n for n in ("base", "new") if n in result]
    head = "| concurrent streams | " + " | ".join(str(n) for n in LEVELS) + " |"
    lines = [head, "|---" * (len(LEVELS) + 1) + "|"]
    for name in names:
        f = result[name]
        for key, label in (
            ("aggregate_chars_per_s", "aggregate chars/s"),
            ("aggregate_vs_one_stream", "against one stream"),
            ("per_stream_chars_per_s", "per stream chars/s"),
        ):
            cells = [f"{v:,}" if isinstance(v, int) else f"{v}x" for v in f[key].values()]
            lines.append(f"| {name}: {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_MODEL)
    p.add_argument(
        "--base-ref",
        default=BASE_REF,
        help="the git commit served as the base ('' to measure this checkout alone)",
    )
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args()
    result = run(args.checkpoint, args.base_ref or None, args.reps, args.port, not args.no_plot)
    emit(result)
    print(table(result))


if __name__ == "__main__":
    main()
