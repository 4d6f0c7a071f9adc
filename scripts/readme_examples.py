"""Run the README's curl examples against a real server and print (or write) their outputs.

Each example in README.md is a ``curl`` command in a bash block, followed by the output it
gives, as comment lines starting ``# → `` (then ``#   ``). This script starts the service on a
free loopback port with the shipped model on the CPU, runs every example through bash (its
``localhost:8000`` pointed at that server), and renders each output the way the README shows
it: JSON compact, floats to 3 decimals, long strings and lists shortened, fields that change
from run to run (timings, ids, times) as ``"…"``; a stream as its first events and its last.

    .venv/bin/python scripts/readme_examples.py           # print; exit 1 if the README differs
    .venv/bin/python scripts/readme_examples.py --write   # refresh the README's outputs

tests/test_readme_examples.py runs the same check."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT))

from tests.server import run_server  # noqa: E402  (the test suite's way to start a server)

SHOWN, MORE = "# → ", "#   "
VOLATILE = {"timings", "id", "created", "system_fingerprint"}
WIDTH = 96


@dataclass
class Example:
    command: str  # the curl command, continuation lines joined
    first: int  # its output's first line in the README (0-based), or where it would go
    shown: list[str]  # the output as the README shows it (comment lines)


def examples(text: str) -> list[Example]:
    """Every curl command in the README's bash blocks, with the output shown under it."""
    lines = text.splitlines()
    found, in_bash, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_bash = line == "```bash" and not in_bash
        elif in_bash and line.startswith("curl "):
            command = line
            while command.endswith("\\"):
                i += 1
                command = command[:-1].rstrip() + " " + lines[i].strip()
            first = i + 1
            shown = []
            while first + len(shown) < len(lines) and lines[first + len(shown)].startswith(
                (SHOWN, MORE)
            ):
                shown.append(lines[first + len(shown)])
            found.append(Example(command, first, shown))
        i += 1
    return found


def run(command: str, url: str) -> str:
    """The command's stdout, with the README's server replaced by ``url``."""
    command = command.replace("localhost:8000", url.removeprefix("http://"))
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{command!r} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _short(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, str):
        return value if len(value) <= 40 else value[:40] + "…"
    if isinstance(value, list):
        head = [_short(v) for v in value[:2]]
        return [*head, "…"] if len(value) > 2 else head
    if isinstance(value, dict):
        items = list(value.items())
        out = {k: "…" if k in VOLATILE else _short(v) for k, v in items[:12]}
        if len(items) > 12:
            out["…"] = "…"
        return out
    return value


def _json(value: Any) -> str:
    return json.dumps(_short(value), ensure_ascii=False)


def _events(output: str) -> list[tuple[str, str]]:
    """Server-sent events as (event, data) pairs."""
    out = []
    for block in output.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("event", "message"), fields["data"]))
    return out


def render(output: str) -> list[str]:
    """The README's lines for one output."""
    if output.lstrip().startswith(("event:", "data:", ":")):
        events = _events(output)
        keep = events[:4] + ([("…", "")] if len(events) > 5 else []) + events[-1:]
        parts = [
            name if name == "…" else f"{name} {_json(json.loads(data))}" for name, data in keep
        ]
    else:
        value = json.loads(output)
        names = isinstance(value, list) and all(isinstance(v, str) for v in value)
        # A list of short texts (samples picked out with jq) is shown whole.
        parts = [json.dumps(value, ensure_ascii=False) if names else _json(value)]
    lines: list[str] = []
    for part in parts:
        lines += textwrap.wrap(part, WIDTH - 4, break_long_words=False, break_on_hyphens=False)
    return [SHOWN + lines[0]] + [MORE + line for line in lines[1:]]


def refresh(url: str, write: bool) -> bool:
    """Run every example; True when the README shows what they give (after ``write``, it
    does)."""
    text = README.read_text(encoding="utf-8")
    found = examples(text)
    lines = text.splitlines()
    outputs = [render(run(ex.command, url)) for ex in found]
    for ex, got in zip(found, outputs, strict=True):
        print(ex.command, *got, "", sep="\n")
    same = all(got == ex.shown for ex, got in zip(found, outputs, strict=True))
    # From the end, so that the earlier examples' line numbers hold.
    for ex, got in reversed(list(zip(found, outputs, strict=True))):
        lines[ex.first : ex.first + len(ex.shown)] = got
    if write and not same:
        README.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write the outputs into README.md")
    ap.add_argument("--model", default="models/alice.pt", help="checkpoint served as 'alice'")
    args = ap.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        run_server(Path(tmp), f"alice={args.model}", device="cpu") as server,
    ):
        same = refresh(server.url, args.write)
    if not same:
        print("README.md " + ("updated" if args.write else "differs (run with --write)"))
    return 0 if same or args.write else 1


if __name__ == "__main__":
    sys.exit(main())
