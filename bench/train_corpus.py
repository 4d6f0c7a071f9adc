"""Training on a large corpus that the bench makes itself: the Python sources on this machine
(the standard library and site-packages, in a fixed order, repeated if needed) concatenated to
``--mb`` megabytes, as a char-rnn user trains on the Linux source or enwik8.

``python -m training fit`` runs as a user runs it (a subprocess, default batch and threads)
with ``--eval-every 50 --eval-chars 200000``; the benchmark reports

- wall time from start to the first training step with a cold id cache (the corpus is encoded
  then) and with a warm one (it is memory-mapped);
- the peak RSS of each run (the kernel's VmHWM of the training process);
- wall time to the first best checkpoint (the cold run).

The baseline, measured in the same run where it fits in memory (``--baseline``), is the way the
trainer read a corpus before: the whole text as a ``str``, a list of ints, an int64 tensor."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from bench.common import emit, machine

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {
    "peak_rss_mb": 2500,
    "cold_first_step_s": 60,
    "warm_first_step_s": 10,
    "first_best_checkpoint_s": 300,
}


def make_corpus(path: Path, mb: int) -> dict[str, object]:
    """Concatenate the machine's .py files (sorted, UTF-8 only) to ``mb`` megabytes."""
    want = mb * 1_000_000
    if path.exists() and path.stat().st_size == want:
        return {"corpus_bytes": want, "corpus_reused": True}
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    files = sorted(
        Path(r) / f
        for root in dict.fromkeys(roots)
        for r, _, fs in os.walk(root)
        for f in fs
        if f.endswith(".py")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    size, passes = 0, 0
    with tmp.open("wb") as out:
        while size < want:
            passes += 1
            for f in files:
                try:
                    raw = f.read_bytes()
                    raw.decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                raw = raw[: want - size]
                while raw and (raw[-1] & 0xC0) == 0x80:  # never cut a character in two
                    raw = raw[:-1]
                if raw and raw[-1] >= 0xC0:
                    raw = raw[:-1]
                out.write(raw)
                size += len(raw)
                if size >= want - 3:
                    break
            if size >= want - 3:
                break
        out.write(b"\n" * (want - size))
    tmp.replace(path)
    return {"corpus_bytes": want, "corpus_files": len(files), "corpus_passes": passes}


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _records(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # being written
    return out


def _first(metrics: Path, key: str) -> dict | None:
    return next((r for r in _records(metrics) if key in r), None)


def fit_run(data: Path, out: Path, cache: Path, until: str, limit_s: float) -> dict[str, object]:
    """Run ``training fit`` until ``until`` happens ("first_step" or "best"), then SIGINT it."""
    cmd = [
        sys.executable,
        "-m",
        "training",
        "fit",
        "--data",
        str(data),
        "--out",
        str(out),
        "--eval-every",
        "50",
        "--eval-chars",
        "200000",
        "--cache-dir",
        str(cache),
        "--quiet",
    ]
    metrics = out.with_name(out.stem + ".metrics.jsonl")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    result: dict[str, object] = {}
    peak = 0
    while proc.poll() is None and time.perf_counter() - t0 < limit_s:
        peak = max(peak, _hwm_kb(proc.pid))
        if "first_step_s" not in result and _first(metrics, "first_step_s"):
            result["first_step_s"] = round(time.perf_counter() - t0, 1)
        if "best_s" not in result and out.exists():
            result["best_s"] = round(time.perf_counter() - t0, 1)
            if (v := _first(metrics, "val_nll")) is not None:
                result["best_val_nll"] = round(v["val_nll"], 4)
                result["best_at_step"] = v["step"]
        if (until == "first_step" and "first_step_s" in result) or (
            until == "best" and "best_s" in result
        ):
            break
        time.sleep(0.05)
    peak = max(peak, _hwm_kb(proc.pid))
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    if proc.returncode not in (0, 130):
        raise RuntimeError(f"fit failed ({proc.returncode}): {err.decode()[-2000:]}")
    result["peak_rss_mb"] = round(peak / 1024)
    speeds = [r["chars_per_s"] for r in _records(metrics) if "chars_per_s" in r]
    if speeds:  # the median of the logged windows (the first one holds the warm-up)
        result["chars_per_s"] = round(sorted(speeds)[len(speeds) // 2])
    return result


BASELINE = """
import sys, torch
from charrnn.vocab import Vocabulary
text = open(sys.argv[1], encoding="utf-8").read()
ids = torch.tensor(Vocabulary.from_text(text).encode(text), dtype=torch.long)
"""


def baseline_rss_mb(data: Path) -> int:
    """Peak RSS of the former way to load the corpus (str -> list of ints -> int64 tensor)."""
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, str(data)], cwd=ROOT)
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    return round(usage.ru_maxrss / 1024)


def run(
    mb: int = 200, work: Path | None = None, baseline: bool = True, until: str = "best"
) -> dict[str, object]:
    work = work or Path(os.environ.get("TMPDIR", "/tmp")) / "charrnn-bench-corpus"
    data = work / f"python-{mb}mb.txt"
    out: dict[str, object] = {"benchmark": "train_corpus", "machine": machine()}
    t = time.perf_counter()
    out |= make_corpus(data, mb)
    out["corpus_make_s"] = round(time.perf_counter() - t, 1)
    cache = work / "ids"
    shutil.rmtree(cache, ignore_errors=True)
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cold = fit_run(data, runs / "cold" / "m.pt", cache, until, 900)
    warm = fit_run(data, runs / "warm" / "m.pt", cache, "first_step", 300)
    out |= {
        "cold_first_step_s": cold.get("first_step_s"),
        "warm_first_step_s": warm.get("first_step_s"),
        "first_best_checkpoint_s": cold.get("best_s"),
        "first_best_val_nll": cold.get("best_val_nll"),
        "first_best_at_step": cold.get("best_at_step"),
        "train_chars_per_s": cold.get("chars_per_s"),
        "peak_rss_mb": max(int(cold["peak_rss_mb"]), int(warm["peak_rss_mb"])),  # type: ignore[call-overload]
        "peak_rss_mb_cold": cold["peak_rss_mb"],
        "peak_rss_mb_warm": warm["peak_rss_mb"],
        "id_cache_bytes": sum(p.stat().st_size for p in cache.iterdir()),
        "targets": TARGETS,
    }
    out["meets_targets"] = all(
        out.get(k) is not None and out[k] <= v  # type: ignore[operator]
        for k, v in TARGETS.items()
    )
    if baseline:
        b = baseline_rss_mb(data)
        out["baseline_load_peak_rss_mb"] = b
        out["peak_rss_vs_baseline"] = round(int(out["peak_rss_mb"]) / b, 3)  # type: ignore[call-overload]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mb", type=int, default=200, help="corpus size in megabytes")
    p.add_argument("--work", type=Path, help="folder for the corpus, its ids and the runs")
    p.add_argument("--no-baseline", action="store_true", help="skip the in-memory baseline")
    p.add_argument(
        "--until",
        choices=["best", "first_step"],
        default="best",
        help="stop the cold run at its first best checkpoint (default) or its first step",
    )
    args = p.parse_args()
    emit(run(args.mb, args.work, not args.no_baseline, args.until))


if __name__ == "__main__":
    main()
