"""``python -m app``'s command line: --help, --host, --port and --models, each overriding its
``CHARRNN_*`` variable, and a bad argument refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.__main__ import main
from tests.server import ROOT, free_port


def test_help_prints_the_flags_and_exits_0(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--models", "CHARRNN_"):
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["8000"], "unrecognized arguments: 8000"),
        (["--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
    ],
)
def test_a_bad_argument_is_refused_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("python -m app: error: ") and message in lines[0]


def test_a_bad_flag_value_is_named_as_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("CHARRNN_PORT", "8000")
    assert main(["--port", "70000"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "error: cannot start: --port: Input should be less than or equal to 65535 (got 70000)"
    ]


def test_models_flag_overrides_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    """The variable names the shipped model, which loads; the flag's checkpoint is the one
    tried (and refused, since it does not exist), before any server starts."""
    missing = tmp_path / "missing.pt"
    monkeypatch.setenv("CHARRNN_MODELS", f"alice={ROOT / 'models/alice.pt'}")
    assert main(["--models", f"mine={missing}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], lines


@pytest.mark.e2e
@pytest.mark.slow
def test_host_port_and_models_flags_win_over_the_variables(tiny_checkpoint: Path):
    """The server listens on --port, not CHARRNN_PORT, and serves --models, not
    CHARRNN_MODELS (whose checkpoint does not even exist)."""
    port = free_port()
    env = {
        **os.environ,
        "CHARRNN_HOST": "0.0.0.0",
        "CHARRNN_PORT": str(free_port()),
        "CHARRNN_MODELS": "x=/nonexistent.pt",
        "CHARRNN_THREADS": "1",
    }
    argv = ["--host", "127.0.0.1", "--port", str(port), "--models", f"tiny={tiny_checkpoint}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", *argv],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "nothing answered on --port"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert [m["name"] for m in httpx.get(f"{url}/info").json()["models"]] == ["tiny"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
