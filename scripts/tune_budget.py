"""The budget-recipe grid: ``python -m training fit --max-minutes M`` on each corpus with each
recipe variant, one run at a time, and a JSON grid of their held-out NLLs (the best validation
NLL on the last --val-frac, nats/char), so a default is picked on every text, not one.

Run it alone on the machine: two PyTorch processes on two cores slow each other about tenfold,
and a budgeted run then learns less. The grid is also written to OUT/grid.json after each run,
so an interrupted grid keeps what it measured.

usage: scripts/tune_budget.py --minutes 8 [--data A.txt B.txt ...] [--variant NAME="FLAGS" ...]
                              [--fit-args "FLAGS"] [--out runs/tune]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CORPORA = [DATA / n for n in ("alice.txt", "pride_and_prejudice.txt", "war_and_peace_part1.txt")]
# The budget recipe as it is, and the AWD-LSTM regularisers one at a time and together, on top
# of what the recipe picks from the epochs its budget buys.
VARIANTS = {
    "recipe": "",
    "weight-drop": "--weight-drop 0.3",
    "locked": "--locked-dropout",
    "ar-tar": "--ar 2 --tar 1",
    "awd": "--weight-drop 0.3 --locked-dropout --ar 2 --tar 1",
}
# What the grid records from each checkpoint's settings: what the recipe picked.
PICKED = (
    "dropout",
    "embed_dropout",
    "weight_decay",
    "weight_drop",
    "locked_dropout",
    "epochs",
    "batch_size",
    "lr",
    "precision",
)


def fit(data: Path, out: Path, minutes: float, flags: list[str]) -> dict[str, Any]:
    """One budgeted run; its summary, or the reason it failed."""
    for old in out.parent.glob(f"{out.stem}.*"):  # a fresh run: no metrics to append to
        old.unlink()
    cmd = [sys.executable, "-m", "training", "fit", "--data", str(data), "--out", str(out)]
    cmd += ["--max-minutes", str(minutes), "--quiet", *flags]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = round(time.perf_counter() - t0, 1)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": lines[-1], "wall_s": wall}
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "val_nll": summary["best_val_nll"],
        "val_bpc": summary["best_val_bpc"],
        "epochs": summary["epochs"],
        "steps": summary["steps"],
        "wall_s": wall,
        **_picked(out),
    }


def _picked(out: Path) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from charrnn.checkpoint import load_checkpoint

    meta = load_checkpoint(out).meta
    train = meta.get("train", {})
    return {
        "budget_epochs_planned": meta.get("metrics", {}).get("budget_epochs_planned"),
        "settings": {k: train.get(k) for k in PICKED},
    }


def parse_variants(given: list[str] | None) -> dict[str, list[str]]:
    if not given:
        return {name: shlex.split(flags) for name, flags in VARIANTS.items()}
    variants = {}
    for item in given:
        name, sep, flags = item.partition("=")
        if not sep or not name:
            raise SystemExit(f'error: --variant takes NAME="FLAGS", got {item!r}')
        variants[name] = shlex.split(flags)
    return variants


def against_first(runs: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Each variant's NLL minus the first variant's, per corpus, and its worst: a default must
    not lose on any text (worst <= 0), not only win on average."""
    table: dict[str, Any] = {}
    for name in names[1:]:
        deltas = {
            corpus: round(row[name]["val_nll"] - row[names[0]]["val_nll"], 4)
            for corpus, row in runs.items()
            if "val_nll" in row[name] and "val_nll" in row[names[0]]
        }
        table[name] = {"deltas": deltas, "worst": max(deltas.values(), default=None)}
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, required=True, help="each run's --max-minutes")
    p.add_argument("--data", type=Path, nargs="+", default=CORPORA, help="the corpora")
    p.add_argument(
        "--variant",
        action="append",
        metavar='NAME="FLAGS"',
        help="a recipe variant: fit flags added to the budget recipe (repeatable; default: "
        + ", ".join(VARIANTS)
        + ")",
    )
    p.add_argument("--fit-args", default="", help="flags every run gets, e.g. '--threads 2'")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "tune", help="checkpoints, grid")
    args = p.parse_args()
    if args.minutes <= 0:
        raise SystemExit("error: --minutes must be > 0")
    missing = [str(d) for d in args.data if not d.is_file()]
    if missing:
        raise SystemExit(f"error: corpus not found: {', '.join(missing)}")
    variants = parse_variants(args.variant)
    common = shlex.split(args.fit_args)
    args.out.mkdir(parents=True, exist_ok=True)
    grid: dict[str, Any] = {"minutes": args.minutes, "fit_args": common, "variants": variants}
    grid["runs"] = {}
    for data in args.data:
        row = grid["runs"].setdefault(data.stem, {})
        for name, flags in variants.items():
            out = args.out / data.stem / f"{name}.pt"
            row[name] = fit(data, out, args.minutes, [*common, *flags])
            print(
                f"{data.stem} {name}: {row[name].get('val_nll', row[name].get('error'))}",
                file=sys.stderr,
            )
            (args.out / "grid.json").write_text(json.dumps(grid, indent=2))
    grid["best"] = {
        corpus: min(
            (v for v in row if "val_nll" in row[v]), key=lambda v: row[v]["val_nll"], default=None
        )
        for corpus, row in grid["runs"].items()
    }
    grid["vs_first_variant"] = against_first(grid["runs"], list(variants))
    (args.out / "grid.json").write_text(json.dumps(grid, indent=2))
    print(json.dumps(grid, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
