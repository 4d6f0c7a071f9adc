"""Load, faults and hostile input against a real server (loopback only, bounded in count
and time). Slow tests carry the ``slow`` mark. The malformed bodies and queries themselves,
which need no socket, are tests/test_hostile_input.py's."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from httpx_sse import aconnect_sse

from charrnn import Vocabulary, load_checkpoint, save_checkpoint
from tests.conftest import make_text, tiny_fit_args, tiny_model
from tests.server import ROOT, Server, run_server
from training.__main__ import main as train_main
from training.outputs import last_path

pytestmark = [
    pytest.mark.timeout(300),
    # The server schemathesis runs against (the ``server`` fixture); the load, fault and
    # shutdown tests each start one of their own, which they load, kill or measure.
    pytest.mark.server(max_new_chars_limit=500, stream_backlog=512),
]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def sse_client(
    c: httpx.AsyncClient, url: str, body: dict, answered: asyncio.Queue | None = None
) -> tuple[int, str | None, int, dict]:
    """(status, final event, tokens, headers) of one streaming request.

    It counts ``event: token`` lines in the raw bytes and parses only the final event: two
    hundred clients in one Python process must not cost more CPU than the server they test."""
    async with c.stream("POST", f"{url}/generate/stream", json=body) as r:
        if answered is not None:
            answered.put_nowait(r.status_code)
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None, 0, dict(r.headers)
        raw = bytearray()
        async for chunk in r.aiter_raw():
            raw += chunk
        tokens = raw.count(b"event: token\n")
        final = None
        for name in ("done", "error"):
            marker = f"event: {name}\ndata: ".encode()
            if marker in raw:
                final = name
                data = raw[raw.index(marker) + len(marker) :].split(b"\n", 1)[0]
                if name == "done":
                    assert len(json.loads(data)["generated_text"]) == tokens
        return 200, final, tokens, dict(r.headers)


PROBE = """
import sys, time, httpx
sys.stdin.readline()  # started ahead, so that it probes as soon as it is told to
with httpx.Client(timeout=5) as c:
    while True:
        for route in ("/health", "/ready"):
            t0 = time.perf_counter()
            assert c.get(sys.argv[1] + route).status_code == 200
            print(round((time.perf_counter() - t0) * 1e3, 2), flush=True)
        time.sleep(0.005)
"""

# -- load --------------------------------------------------------------------------------


def batch_while_queued(s: Server, timeout: float = 60.0) -> list[float]:
    """The active-generation counts scraped while generations were queued: from when the
    queue first holds one (started before the requests go out, so a machine that drains the
    queue quickly cannot empty it before the first scrape) until it is empty again."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = s.metrics("charrnn_active_generations", "charrnn_queue_depth", model="tiny")
        if m["charrnn_queue_depth"] > 0:
            seen.append(m["charrnn_active_generations"])
        elif seen:
            return seen
        time.sleep(0.02)
    raise AssertionError(f"the queue did not fill and drain in {timeout:.0f} s")


@pytest.mark.e2e
@pytest.mark.slow
def test_waves_of_200_sse_clients(tiny_checkpoint, tmp_path):
    with run_server(tmp_path, f"tiny={tiny_checkpoint}", max_concurrent=32, max_queue=64) as s:
        report: dict[str, list] = {
            "rss": [],
            "ok": [],
            "429": [],
            "health_ms": [],
            "health_probes": [],
            "full_batch_scrapes": [],
        }

        async def wave(i: int) -> None:
            # Health is probed from another process (this one's event loop is busy parsing 200
            # streams), from when every client has its answer until the last stream ends.
            probe = subprocess.Popen(
                [sys.executable, "-c", PROBE, s.url],
                text=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            try:
                limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
                answered: asyncio.Queue[int] = asyncio.Queue()
                async with httpx.AsyncClient(timeout=120, limits=limits) as c:
                    bodies = [
                        {"prime": "Alice", "max_new_chars": 1500, "seed": i * 1000 + k}
                        for k in range(200)
                    ]
                    # While the queue holds requests, the batch stays full, however fast this
                    # machine drains it: scraped from before the requests go out.
                    scraping = asyncio.create_task(asyncio.to_thread(batch_while_queued, s))
                    tasks = [asyncio.create_task(sse_client(c, s.url, b, answered)) for b in bodies]
                    statuses = [await answered.get() for _ in bodies]
                    probe.stdin.write("go\n")
                    probe.stdin.flush()
                    seen = await scraping
                    results = await asyncio.gather(*tasks)
            finally:
                probe.terminate()
            latencies = [float(x) for x in probe.communicate(timeout=10)[0].split()]
            # Between two rounds the finished rows leave before the next ones are primed, so
            # a scrape may catch a batch that is refilling; it is never over the limit.
            assert seen and max(seen) == 32, seen
            accepted = statuses.count(200)
            for status, final, tokens, headers in results:
                assert status in (200, 429), status
                if status == 200:
                    assert final == "done" and tokens == 1500
                else:
                    assert headers["retry-after"] == "1"
            report["ok"].append(accepted)
            report["429"].append(statuses.count(429))
            report["health_ms"].append(round(max(latencies, default=0.0), 1))
            report["health_probes"].append(len(latencies))
            report["full_batch_scrapes"].append(f"{seen.count(32)}/{len(seen)}")

        for i in range(5):
            asyncio.run(wave(i))
            report["rss"].append(rss_kib(s.proc.pid))
        print(f"\nload waves: {json.dumps(report)}")
        assert sum(report["ok"]) > 0
        assert report["rss"][4] < report["rss"][1] * 1.10
        # How many probes fit in a wave depends on how fast the machine drains it; a few per
        # wave are enough for the latency bound to mean something.
        assert min(report["health_probes"]) >= 4
        assert max(report["health_ms"]) < 100
        assert s.metric("charrnn_active_generations", model="tiny") == 0
        assert s.metric("charrnn_queue_depth", model="tiny") == 0


# -- faults ------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
def test_100_clients_disconnecting_mid_stream_leak_nothing(tiny_checkpoint, tmp_path):
    with run_server(tmp_path, f"tiny={tiny_checkpoint}", max_concurrent=64, max_queue=64) as s:
        rng = random.Random(0)

        async def quitter(c: httpx.AsyncClient, k: int) -> None:
            stop_after = rng.randint(0, 200)
            body = {"prime": "Alice", "max_new_chars": 5000, "seed": k}
            async with aconnect_sse(c, "POST", f"{s.url}/generate/stream", json=body) as es:
                n = 0
                async for sse in es.aiter_sse():
                    n += sse.event == "token"
                    if n >= stop_after:
                        break

        async def round_(r: int) -> None:
            async with httpx.AsyncClient(
                timeout=60, limits=httpx.Limits(max_connections=200, max_keepalive_connections=0)
            ) as c:
                await asyncio.gather(*(quitter(c, r * 100 + k) for k in range(100)))

        asyncio.run(round_(0))
        before = rss_kib(s.proc.pid)
        for r in range(1, 3):
            asyncio.run(round_(r))
        deadline = time.monotonic() + 10
        while s.metric("charrnn_active_generations", model="tiny") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.metric("charrnn_active_generations", model="tiny") == 0
        assert s.metric("charrnn_queue_depth", model="tiny") == 0
        # 300 generations of up to 5000 characters were asked for; the disconnects stopped them.
        assert s.metric("charrnn_generated_characters_total", model="tiny") < 300 * 1000
        assert rss_kib(s.proc.pid) < before * 1.10
        assert httpx.get(f"{s.url}/health").status_code == 200


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_with_open_streams(tiny_checkpoint, tmp_path):
    # The long streams ask for more than any machine makes in the grace period.
    limits = {"shutdown_grace_s": 1, "max_new_chars_limit": 10**7}
    with run_server(tmp_path, f"tiny={tiny_checkpoint}", **limits) as s:

        async def run() -> None:
            async with httpx.AsyncClient(timeout=60) as c, httpx.AsyncClient(timeout=5) as probe:
                assert (await probe.get(f"{s.url}/ready")).status_code == 200
                body = {"prime": "Alice", "max_new_chars": 10**7}
                streams = [
                    asyncio.create_task(sse_client(c, s.url, {**body, "seed": k})) for k in range(4)
                ]
                short = asyncio.create_task(
                    sse_client(c, s.url, {"prime": "Al", "max_new_chars": 30})
                )
                await asyncio.sleep(0.5)
                t0 = time.monotonic()
                s.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                r = await probe.get(f"{s.url}/ready")
                assert r.status_code == 503 and r.json()["status"] == "shutting_down"
                r = await probe.post(f"{s.url}/generate", json={"prime": "Alice"})
                assert r.status_code == 503
                results = await asyncio.gather(*streams, short)
                # The short one finishes; the long ones are cut off after the grace period.
                assert [res[:2] for res in results] == [(200, "error")] * 4 + [(200, "done")]
                rc = await asyncio.to_thread(s.proc.wait, 30)
                assert rc == 0 and time.monotonic() - t0 < 15

        asyncio.run(run())


@pytest.mark.e2e
@pytest.mark.slow
def test_kill_9_during_training_never_loses_a_checkpoint(corpus_file, tmp_path):
    out = tmp_path / "m.pt"
    args = [sys.executable, "-m", "training", *tiny_fit_args(corpus_file, out, 12)]
    rng = random.Random(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(4):
        proc = subprocess.Popen(
            args + (["--resume"] if last_path(out).exists() else []),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(2.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in (out, last_path(out)):
            if path.exists():
                load_checkpoint(path)  # always loadable: writes are atomic
    # A killed write may leave its temp file behind; a run that completes leaves none of its own.
    litter = {p for p in tmp_path.iterdir() if p.name.endswith(".tmp")}
    done = subprocess.run(
        args + (["--resume"] if last_path(out).exists() else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(last_path(out)).extra["resume"]["progress"]["epoch"] == 12
    assert {p for p in tmp_path.iterdir() if p.name.endswith(".tmp")} == litter


@pytest.mark.e2e
def test_full_disk_fails_with_one_line_and_keeps_earlier_checkpoints(
    corpus_file, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "m.pt"

    def base(epochs: int, *more: str) -> list[str]:
        return tiny_fit_args(corpus_file, out, epochs, *more)

    assert train_main(base(1)) == 0
    capsys.readouterr()
    saved = {p: p.read_bytes() for p in (out, last_path(out))}

    def no_space(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("charrnn.checkpoint.torch.save", no_space)
    assert train_main(base(3, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    for path, data in saved.items():
        assert path.read_bytes() == data
        load_checkpoint(path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _bad_checkpoint(kind: str, path: Path, marker: Path) -> str:
    vocab = Vocabulary.from_text(make_text())
    if kind == "missing":
        return "file not found"
    if kind == "empty":
        path.write_bytes(b"")
        return "file is empty"
    save_checkpoint(path, tiny_model(vocab), vocab)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
        return "corrupt or truncated"
    if kind == "corrupt":
        data = bytearray(path.read_bytes())
        data[200:400] = os.urandom(200)
        path.write_bytes(bytes(data))
        return str(path)
    payload = torch.load(path, weights_only=True)
    if kind == "wrong-version":
        payload["format_version"] = 7
        message = "unsupported format version 7"
    elif kind == "foreign-vocabulary":
        payload["vocab"] = "".join(sorted(set("0123456789")))
        message = "vocabulary has 10 characters"
    else:  # malicious pickle
        payload["meta"] = {"x": _Payload(str(marker))}
        message = "refused to load"
    torch.save(payload, path)
    return message


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "empty",
        "truncated",
        "corrupt",
        "wrong-version",
        "foreign-vocabulary",
        "malicious-pickle",
    ],
)
@pytest.mark.e2e
def test_startup_refuses_bad_checkpoints_and_runs_no_code(kind, tmp_path):
    path, marker = tmp_path / "bad.pt", tmp_path / "pwned"
    message = _bad_checkpoint(kind, path, marker)
    lines = _refused_start({"CHARRNN_MODELS": f"bad={path}"})
    assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], lines
    assert not marker.exists()


def _refused_start(env: dict[str, str]) -> list[str]:
    """``python -m app`` with only ``env`` (and a PATH): it must exit non-zero; its stderr
    lines."""
    done = subprocess.run(
        [sys.executable, "-m", "app"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode != 0, done.stderr
    return done.stderr.strip().splitlines()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CHARRNN_DECODE_WEIGHTS", "int4", "'auto', 'fp32' or 'int8'"),
        ("CHARRNN_PORT", "eighty", "valid integer"),
        ("CHARRNN_MAX_CONCURRENT", "0", "greater than or equal to 1"),
        # Below what one hand-over brings a reader at full speed: every stream would be cut.
        ("CHARRNN_STREAM_BACKLOG", "100", "greater than or equal to 512"),
    ],
)
@pytest.mark.e2e
def test_startup_refuses_a_bad_setting_in_one_line(variable, value, message):
    lines = _refused_start({variable: value})
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot start: {variable}: ") and message in lines[0]
    assert repr(value) in lines[0]


# -- hostile input -----------------------------------------------------------------------


@pytest.mark.e2e
def test_schemathesis_finds_no_server_error_or_schema_violation(server):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{server.url}/openapi.json",
            "--max-examples",
            "10",
            "--workers",
            "1",
            "--generation-deterministic",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance",
            "--request-timeout",
            "30",
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-4000:]
    assert "passed" in done.stdout


@pytest.mark.e2e
def test_slow_reader_is_cut_off_without_stalling_others(tiny_checkpoint, tmp_path):
    # The smallest backlog allowed, and a generation (~10 MB of events) far larger than what
    # the socket buffers between the server and a reader that never reads can hold.
    with run_server(
        tmp_path, f"tiny={tiny_checkpoint}", stream_backlog=512, max_new_chars_limit=250_000
    ) as server:
        body = json.dumps({"prime": "Alice", "max_new_chars": 250_000, "seed": 1}).encode()
        host, port = server.url.removeprefix("http://").split(":")
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        slow.connect((host, int(port)))
        slow.sendall(
            b"POST /generate/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        try:
            # Meanwhile other clients stream at full speed.
            t0 = time.perf_counter()
            for k in range(5):
                r = httpx.post(
                    f"{server.url}/generate",
                    json={"prime": "The", "max_new_chars": 200, "seed": k},
                    timeout=30,
                )
                assert r.status_code == 200
            assert time.perf_counter() - t0 < 20
            deadline = time.monotonic() + 30
            while server.metric("charrnn_slow_client_cutoffs_total", model="tiny") < 1:
                assert time.monotonic() < deadline, "the stalled reader was never cut off"
                time.sleep(0.05)
            assert server.metric("charrnn_active_generations", model="tiny") == 0
            # The server closed the connection: reading what is left ends, without a done.
            slow.settimeout(10)
            received = b""
            try:
                while chunk := slow.recv(65536):
                    received += chunk
            except ConnectionResetError:
                pass
            assert b"event: done" not in received
            assert "cut off a client" in server.log()
        finally:
            slow.close()
