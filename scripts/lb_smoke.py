"""Load-balancer smoke test: CharRNN replicas behind nginx (docker-compose.lb.yml), run by
scripts/docker_smoke.sh once the replicas and nginx are up. Python's standard library only.

1. load: concurrent SSE streams through nginx all end with `done` (every character, in order,
   the `done` text equal to the tokens), and both replicas did work (their own /metrics);
2. no buffering: each stream's characters arrive while it is open, in many pieces spread over
   its life, not at the end. The check is calibrated: the same streams through a proxy that
   buffers them (8 KiB at a time, like nginx's proxy buffers) must be flagged by it, or it
   proves nothing;
3. a replica stops (`docker stop`) mid-load: each of its open streams ends with `done` within
   the grace period or with an `error` event, none is cut off silently; the replica exits 0;
4. requests sent after that all succeed, on the other replica.

Replicas are reached only through `docker exec` (their /metrics on the container's own
loopback) and `docker logs` (which replica served which request id); clients talk only to
127.0.0.1. Exits 1 with a line saying what broke.

usage: lb_smoke.py --url URL --replica CID --replica CID [--grace S]
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

STREAMS = 40
LOAD_CHARS = 1200
LONG_CHARS = 10000  # the service's max_new_chars limit: cannot finish within a short grace
STREAM_ROUTE = "/generate/stream"
# A stream "arrives while open" when its first character comes in the first half of its life
# and its characters come in at least this many separate reads (nginx's 4-8 KiB buffers would
# hand a whole stream of LOAD_CHARS over in a handful).
MIN_PIECES = 12


def log(message: str) -> None:
    print(f"lb_smoke: {message}", flush=True)


class Failure(Exception):
    pass


@dataclass
class Stream:
    """One SSE request through nginx and what came back, with the arrival time of each read."""

    max_new: int
    seed: int
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: int | None = None
    t_sent: float = 0.0
    events: list[tuple[float, str, dict]] = field(default_factory=list)
    pieces: list[float] = field(default_factory=list)  # times of reads that carried a token
    problem: str | None = None  # an exception or a protocol fault; None: read to the end
    replica: str | None = None

    @property
    def final(self) -> str | None:
        kind = self.events[-1][1] if self.events else None
        return kind if kind in ("done", "error") else None

    @property
    def t_end(self) -> float:
        return self.events[-1][0] if self.events else self.t_sent

    def tokens(self) -> list[dict]:
        return [d for _, k, d in self.events if k == "token"]

    def check_done(self) -> str | None:
        """None when the stream is a whole, correct generation; else what is wrong."""
        if self.status != 200:
            return f"status {self.status} ({self.problem})"
        if self.problem:
            return self.problem
        if self.final != "done":
            last = self.events[-1][1] if self.events else "nothing"
            return f"ended with {last!r} after {len(self.tokens())} tokens, not `done`"
        tokens = self.tokens()
        if [t["index"] for t in tokens] != list(range(self.max_new)):
            return f"{len(tokens)} token events, not indices 0..{self.max_new - 1}"
        done = self.events[-1][2]
        if done["generated_text"] != "".join(t["text"] for t in tokens):
            return "the `done` text is not the concatenated tokens"
        return None

    def arrived_while_open(self) -> bool:
        tokens = [t for t, k, _ in self.events if k == "token"]
        if not tokens or len(self.pieces) < MIN_PIECES:
            return False
        life = self.t_end - self.t_sent
        return tokens[0] - self.t_sent < 0.5 * life


def run_stream(base: str, s: Stream, timeout: float = 120) -> None:
    """POST one stream and read it piece by piece (read1: whatever has arrived), stamping every
    event completed by a piece with the piece's arrival time."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    body = json.dumps({"prime": "Alice", "max_new_chars": s.max_new, "seed": s.seed})
    headers = {
        "Content-Type": "application/json",
        "Accept": "text/event-stream",
        "X-Request-ID": s.rid,
    }
    try:
        s.t_sent = time.monotonic()
        conn.request("POST", STREAM_ROUTE, body=body, headers=headers)
        resp = conn.getresponse()
        s.status = resp.status
        if resp.status != 200:
            s.problem = resp.read().decode("utf-8", "replace")[:200]
            return
        buf, event, data = b"", None, []
        while True:
            piece = resp.read1(65536)
            now = time.monotonic()
            if not piece:
                break
            buf += piece
            *lines, buf = buf.split(b"\n")
            got_token = False
            for raw in lines:
                line = raw.decode("utf-8").rstrip("\r")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                elif line == "" and (event or data):
                    s.events.append((now, event or "message", json.loads("\n".join(data))))
                    got_token |= event == "token"
                    event, data = None, []
            if got_token:
                s.pieces.append(now)
        if buf.strip() or event or data:
            s.problem = "the stream ended inside an event"
    except (OSError, http.client.HTTPException, ValueError) as e:
        s.problem = f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def run_all(base: str, streams: list[Stream]) -> None:
    threads = [threading.Thread(target=run_stream, args=(base, s)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def docker(*args: str, timeout: float = 60) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise Failure(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout + done.stderr


def stream_requests(cid: str) -> int:
    """Successful stream requests a replica has answered, from its own /metrics."""
    text = docker(
        "exec",
        cid,
        "python",
        "-c",
        "import urllib.request as u; "
        "print(u.urlopen('http://127.0.0.1:8000/metrics', timeout=10).read().decode())",
    )
    pattern = rf'^charrnn_requests_total{{(?=[^}}]*route="{STREAM_ROUTE}")(?=[^}}]*status="200")'
    total = 0.0
    for line in text.splitlines():
        if re.match(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def access_statuses(replicas: list[str], rid: str, logs: dict[str, str]) -> dict[str, list[int]]:
    """The statuses each replica's access log shows for one request id."""
    pattern = re.compile(rf'"[A-Z]+ [^"]*" (\d{{3}}) [^\n]* id={rid}$', re.M)
    return {cid: [int(m) for m in pattern.findall(logs[cid])] for cid in replicas}


def attribute(streams: list[Stream], replicas: list[str]) -> dict[str, str]:
    """Which replica served each stream: the one whose access log has its request id with
    status 200 (a draining replica's 503, retried by nginx, leaves the id in its log too)."""
    logs = {cid: docker("logs", cid) for cid in replicas}
    for s in streams:
        hits = [cid for cid, st in access_statuses(replicas, s.rid, logs).items() if 200 in st]
        s.replica = hits[0] if len(hits) == 1 else None
    return logs


def wait_ready(base: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise Failure(f"{base}/ready did not answer 200 within {seconds:.0f} s")
        time.sleep(1)


def summary(streams: list[Stream]) -> str:
    first = [
        next(t for t, k, _ in s.events if k == "token") - s.t_sent for s in streams if s.tokens()
    ]
    life = [s.t_end - s.t_sent for s in streams]
    pieces = [len(s.pieces) for s in streams]
    return (
        f"first character after {statistics.median(first) * 1e3:.0f} ms (median), "
        f"stream {statistics.median(life):.2f} s, {statistics.median(pieces):.0f} reads"
    )


def phase_load(base: str, replicas: list[str]) -> None:
    before = {cid: stream_requests(cid) for cid in replicas}
    streams = [Stream(LOAD_CHARS, seed) for seed in range(STREAMS)]
    t0 = time.monotonic()
    run_all(base, streams)
    wall = time.monotonic() - t0
    bad = [(s.rid[:8], s.check_done()) for s in streams if s.check_done()]
    if bad:
        raise Failure(f"{len(bad)} of {STREAMS} streams through nginx failed: {bad[:3]}")
    served = {cid: stream_requests(cid) - before[cid] for cid in replicas}
    log(
        f"load: {STREAMS} concurrent streams x {LOAD_CHARS} characters all ended with `done` "
        f"in {wall:.1f} s; served per replica: {list(served.values())}"
    )
    if sum(served.values()) != STREAMS:
        raise Failure(f"the replicas' /metrics count {served}, not {STREAMS} streams")
    if min(served.values()) < STREAMS // 4:
        raise Failure(f"streams did not spread over the replicas (least_conn): {served}")
    slow = [s for s in streams if not s.arrived_while_open()]
    log(f"load: {summary(streams)}; {STREAMS - len(slow)} of {STREAMS} arrived while open")
    if slow:
        s = slow[0]
        raise Failure(
            f"{len(slow)} of {STREAMS} streams came in at once, not while open (nginx buffers?): "
            f"one took {len(s.pieces)} reads over {s.t_end - s.t_sent:.2f} s"
        )


class BufferingProxy:
    """What the check must catch: a proxy that hands a stream on BLOCK bytes at a time (as
    nginx's proxy buffers would, 4-8 KiB each), on a loopback port of its own."""

    BLOCK = 8192

    def __init__(self, upstream: str):
        target = urlsplit(upstream)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
                conn.request("POST", self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.headers["Content-Type"])
                self.end_headers()
                while block := resp.read(BufferingProxy.BLOCK):
                    self.wfile.write(block)
                    self.wfile.flush()
                conn.close()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def phase_control(base: str) -> None:
    """The same streams through a buffering proxy in front of nginx must fail the check."""
    proxy = BufferingProxy(base)
    try:
        streams = [Stream(LOAD_CHARS, 100 + i) for i in range(STREAMS // 4)]
        run_all(proxy.url, streams)
    finally:
        proxy.close()
    bad = [s.check_done() for s in streams if s.check_done()]
    if bad:
        raise Failure(f"streams through the buffering proxy broke: {bad[:2]}")
    flagged = sum(not s.arrived_while_open() for s in streams)
    log(
        f"control ({BufferingProxy.BLOCK // 1024} KiB-buffering proxy): {summary(streams)}; "
        f"{flagged} of {len(streams)} flagged as buffered"
    )
    if flagged < len(streams):
        raise Failure(
            "the buffering check does not notice a buffering proxy: "
            f"{len(streams) - flagged} of {len(streams)} buffered streams passed it"
        )


def check_stopped(streams: list[Stream], victim: str, t_stop: float, grace: float) -> str:
    """Every stream ends whole (`done`) or with an `error` event, whichever replica it was on;
    only the stopped replica's may end with `error`, and not later than its grace period."""
    cut = [s for s in streams if s.check_done() and not (s.final == "error" and not s.problem)]
    if cut:
        s = cut[0]
        raise Failure(
            f"{len(cut)} streams were cut off silently, e.g. after {len(s.tokens())} "
            f"characters: {s.check_done()}"
        )
    unknown = [s.rid[:8] for s in streams if s.replica is None]
    if unknown:
        raise Failure(f"no single replica's log has the request ids {unknown[:3]}")
    on_victim = [s for s in streams if s.replica == victim]
    if not any(s.t_end > t_stop for s in on_victim):
        raise Failure("no stream was open on the stopped replica: the test tested nothing")
    failed = [s for s in streams if s.replica != victim and s.final == "error"]
    if failed:
        raise Failure(f"{len(failed)} streams on the replica that kept running ended in `error`")
    late = max(s.t_end for s in on_victim) - t_stop
    if late > grace + 5:
        raise Failure(f"a stream ran {late:.1f} s past the stop (grace {grace:g} s)")
    errors = sum(s.final == "error" for s in on_victim)
    return (
        f"its {len(on_victim)} streams: {len(on_victim) - errors} `done`, {errors} `error`, "
        f"0 cut off; the other's {len(streams) - len(on_victim)} all `done`"
    )


def check_during(during: list[Stream], replicas: list[str], logs: dict[str, str]) -> str:
    """Requests sent while a replica drains all succeed on the other one."""
    victim, survivor = replicas
    bad = [(s.rid[:8], s.check_done()) for s in during if s.check_done()]
    if bad:
        raise Failure(f"{len(bad)} requests sent during the drain failed: {bad[:3]}")
    if any(s.replica != survivor for s in during):
        raise Failure("a request sent during the drain was served by the draining replica")
    retried = sum(bool(access_statuses(replicas, s.rid, logs)[victim]) for s in during)
    return (
        f"{len(during)} sent during the drain all `done` on the other ({retried} of them after "
        "a 503 from the draining one, retried by nginx)"
    )


def phase_stop(base: str, replicas: list[str], grace: float) -> str:
    """Stop one replica while streams are open on both; returns the survivor."""
    victim, survivor = replicas
    # Half short (finish inside the grace period), half as long as allowed (cannot).
    streams = [Stream(LOAD_CHARS if i % 2 else LONG_CHARS, 200 + i) for i in range(STREAMS)]
    threads = [threading.Thread(target=run_stream, args=(base, s)) for s in streams]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(s.tokens() or s.problem for s in streams) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Requests sent while the victim drains: it answers them 503 before starting any work, and
    # nginx must retry them on the other replica.
    during = [Stream(200, 400 + i) for i in range(STREAMS // 4)]
    sender = threading.Thread(
        target=lambda: (time.sleep(min(1.0, grace / 3)), run_all(base, during))
    )
    t_stop = time.monotonic()
    sender.start()
    docker("stop", "--time", str(int(grace) + 20), victim, timeout=grace + 60)
    stop_s = time.monotonic() - t_stop
    for t in [*threads, sender]:
        t.join()
    exit_code = docker("inspect", "-f", "{{.State.ExitCode}}", victim).strip()
    logs = attribute([*streams, *during], replicas)
    stopped = check_stopped(streams, victim, t_stop, grace)
    drained = check_during(during, replicas, logs)
    log(
        f"stop: `docker stop` took {stop_s:.1f} s (grace {grace:g} s), exit code {exit_code}; "
        f"{stopped}; {drained}"
    )
    if exit_code != "0":
        raise Failure(f"the stopped replica exited {exit_code}, not 0 after a graceful drain")
    return survivor


def phase_after(base: str, survivor: str) -> None:
    before = stream_requests(survivor)
    streams = [Stream(200, 300 + i) for i in range(STREAMS // 2)]
    t0 = time.monotonic()
    run_all(base, streams)
    bad = [(s.rid[:8], s.check_done()) for s in streams if s.check_done()]
    if bad:
        raise Failure(f"{len(bad)} of {len(streams)} requests after the stop failed: {bad[:3]}")
    served = stream_requests(survivor) - before
    if served != len(streams):
        raise Failure(f"the remaining replica served {served} of {len(streams)} requests")
    log(
        f"after: {len(streams)} requests sent after the stop all succeeded on the other "
        f"replica in {time.monotonic() - t0:.1f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="load-balancer smoke test")
    parser.add_argument("--url", required=True, help="nginx in front of the replicas")
    parser.add_argument("--replica", action="append", required=True, help="container id")
    parser.add_argument("--grace", type=float, default=10.0, help="CHARRNN_SHUTDOWN_GRACE_S")
    args = parser.parse_args()
    if len(args.replica) != 2:
        parser.error("give exactly two --replica")
    t0 = time.monotonic()
    try:
        wait_ready(args.url)
        phase_load(args.url, args.replica)
        phase_control(args.url)
        survivor = phase_stop(args.url, args.replica, args.grace)
        phase_after(args.url, survivor)
    except Failure as e:
        print(f"lb_smoke: FAILED: {e}", file=sys.stderr)
        return 1
    log(f"ok in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
