"""Save a screenshot of the playground (docs/playground.png).

Starts the service on a free loopback port with one model, opens the page in headless
Chromium (Debian's ``chromium``, driven by Playwright), types a prime, asks for three short
samples, presses Generate and takes the picture once they are done, each with its seed and
score (coloured by probability, one character's alternatives shown); with a longer --length
the picture is taken mid-stream after --at characters, and Stop is pressed.

    .venv/bin/python scripts/playground_screenshot.py                    # models/alice.pt
    .venv/bin/python scripts/playground_screenshot.py --model /tmp/tiny.pt --out /tmp/pg.png
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
PRIME = "Alice was beginning to get very tired of sitting by her sister on the bank, and "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, name: str, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "CHARRNN_MODELS": f"{name}={model}",
        "CHARRNN_HOST": "127.0.0.1",
        "CHARRNN_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server was not ready in time; see {log_path}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models/alice.pt", help="checkpoint")
    ap.add_argument("--name", help="model name shown on the page (default: the file's stem)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/playground.png")
    ap.add_argument("--prime", default=PRIME)
    ap.add_argument("--temperature", default="0.7")
    ap.add_argument("--top-k", default="")
    ap.add_argument("--top-p", default="0.95")
    ap.add_argument("--seed", default="42")
    ap.add_argument("--length", default="240", help="characters requested (per sample)")
    ap.add_argument("--samples", default="3", help="samples streamed side by side (1: one text)")
    ap.add_argument(
        "--at", type=int, default=800, help="take the picture after this many (all samples)"
    )
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=860)
    ap.add_argument("--scale", type=float, default=1.0, help="device pixel ratio")
    ap.add_argument("--dark", action="store_true", help="prefer the dark colour scheme")
    ap.add_argument("--plain", action="store_true", help="leave 'Colour by probability' off")
    ap.add_argument("--chromium", default=os.environ.get("CHARRNN_CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()

    if not args.model.is_file():
        ap.error(f"no checkpoint at {args.model}")
    if not Path(args.chromium).exists():
        ap.error(f"no Chromium at {args.chromium} (apt-get install chromium)")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(tempfile.gettempdir()) / f"playground-server-{os.getpid()}.log"
    proc, url = start_server(args.model.resolve(), args.name or args.model.stem, log_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(
                viewport={"width": args.width, "height": args.height},
                device_scale_factor=args.scale,
                color_scheme="dark" if args.dark else "light",
            )
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.wait_for_function("!document.querySelector('#generate').disabled")
            page.fill("#prime", args.prime)
            for field, value in [
                ("#temperature", args.temperature),
                ("#top_k", args.top_k),
                ("#top_p", args.top_p),
                ("#seed", args.seed),
                ("#max_new_chars", args.length),
                ("#n", args.samples),
            ]:
                page.fill(field, value)
                page.dispatch_event(field, "input")  # moves the paired slider
            # The output box at its full height from the start, so that the layout holds
            # still while the text streams in and the crop below is exact.
            page.add_style_tag(content=".text { height: min(62vh, 40rem); }")
            if not args.plain:
                page.check("#colour")
            page.click("#generate")
            page.evaluate("document.activeElement && document.activeElement.blur()")
            shown = (  # characters on screen: the one text, or every sample's
                "[...document.querySelectorAll('#generated, #samples .sample-gen')]"
                ".reduce((n, e) => n + e.textContent.length, 0)"
            )
            page.wait_for_function(
                f"{shown} >= {args.at}"
                " || document.querySelector('#state').dataset.state !== 'streaming'"
                " && document.querySelector('#state').dataset.state !== 'connecting'"
            )
            page.evaluate("window.scrollTo(0, 0)")  # pressing Generate may have scrolled
            if not args.plain:  # one character's alternatives, as a hover shows them
                page.hover("#text .tok >> nth=60")
            # Crop below the page's content; no animations, so the caret shows.
            bottom = page.evaluate("document.querySelector('main').getBoundingClientRect().bottom")
            height = min(args.height, int(bottom) + 1)
            clip = {"x": 0, "y": 0, "width": args.width, "height": height}
            page.screenshot(path=str(args.out), animations="disabled", clip=clip)
            state = page.get_attribute("#state", "data-state")
            if state == "streaming":
                try:
                    page.click("#stop", timeout=2000)
                except PlaywrightTimeout:  # it ended between the picture and the click
                    print("note: the generation ended before Stop could be pressed")
            elif state != "done":
                print(f"note: the generation was '{state}' when the picture was taken")
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log_path.unlink(missing_ok=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
