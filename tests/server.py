"""Run the real service (``python -m app``) as a subprocess on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0 when absent)."""
        return self.metrics(name, **labels)[name]

    def metrics(self, *names: str, **labels: str) -> dict[str, float]:
        """Several samples from one scrape of /metrics, so they are seen at one moment."""
        return metric_values(httpx.get(f"{self.url}/metrics").text, names, labels)


def metric_values(
    exposition: str, names: Iterable[str], labels: Mapping[str, str]
) -> dict[str, float]:
    """The value of each sample named in ``names`` whose labels include ``labels``, in a
    Prometheus text exposition (0 when absent)."""
    values = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in values and all(sample.labels.get(k) == v for k, v in labels.items()):
                values[sample.name] = sample.value
    return values


@contextmanager
def run_server(
    tmp_path: Path,
    models: str,
    wait_ready: bool = True,
    module: str = "app",
    env: dict[str, str] | None = None,
    **settings: str | int,
) -> Iterator[Server]:
    """The service (``python -m module``) on a free loopback port; ``settings`` are
    ``CHARRNN_*`` variables without the prefix, ``env`` any other variables."""
    port = free_port()
    env = {
        **os.environ,
        **(env or {}),
        "CHARRNN_PORT": str(port),
        "CHARRNN_HOST": "127.0.0.1",
        "CHARRNN_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "CHARRNN_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    }
    env.update({f"CHARRNN_{k.upper()}": str(v) for k, v in settings.items()})
    if models:  # else they come from the file CHARRNN_ENV_FILE names
        env["CHARRNN_MODELS"] = models
    else:
        env.pop("CHARRNN_MODELS", None)
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        if wait_ready:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, f"server exited early:\n{server.log()}"
                assert time.monotonic() < deadline, f"server not ready:\n{server.log()}"
                try:
                    if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
