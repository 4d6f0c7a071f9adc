"""Base against new, pair by pair: benchmark modules run in a git worktree of ``--base-ref``
and in this checkout, in turns (base, new, base, new, ...), so that a drift of the machine's
speed hits both alike. Each run is the module's own ``python -m bench.<module>`` in that
checkout (its server, its code); the figures below are read from the JSON it prints.

Prints JSON: per figure, the base and new values of every pair, each pair's ratio new/base
(higher is better for rates, lower for times and gaps: ``better`` says which) and the
ratios' spread. Run it alone on the machine.

usage: python -m bench.pairs --base-ref REV [--pairs 3] [--only burst,structured]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench.common import ROOT
from bench.concurrency import checkout

# The figures compared, per module: name -> "higher" or "lower" is better.
FIGURES: dict[str, dict[str, str]] = {
    "serve_throughput": {
        "one_stream_chars_per_s": "higher",
        "streams32_aggregate_chars_per_s": "higher",
        "ttfc_ms_prime10_cached": "lower",
    },
    "burst": {
        "running_largest_gap_ms": "lower",
        "short_prime_mid_burst_first_char_ms": "lower",
    },
    "structured": {
        "one_stream_regex_chars_per_s": "higher",
        "streams64_half_regex_chars_per_s": "higher",
        "streams64_chars_per_s": "higher",
    },
    "scoring": {"score_chars_per_s": "higher"},
}


def run_module(module: str, root: Path) -> dict[str, object]:
    """``python -m bench.<module>`` in checkout ``root``: the JSON object it printed."""
    out = subprocess.run(
        [sys.executable, "-m", f"bench.{module}"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    start = out.index("{")  # the module's JSON, after anything it printed before
    return json.JSONDecoder().raw_decode(out[start:])[0]


def compare(base_ref: str, pairs: int, modules: list[str]) -> dict[str, object]:
    figures: dict[str, dict[str, list[float]]] = {}
    with checkout(base_ref) as base:
        for _ in range(pairs):
            for module in modules:
                for side, root in (("base", base), ("new", ROOT)):
                    result = run_module(module, root)
                    for name in FIGURES[module]:
                        value = result.get(name)
                        if isinstance(value, int | float):
                            figures.setdefault(name, {"base": [], "new": []})[side].append(value)
    out: dict[str, object] = {"base_ref": base_ref, "pairs": pairs}
    for module in modules:
        for name, better in FIGURES[module].items():
            if name not in figures:
                continue
            b, n = figures[name]["base"], figures[name]["new"]
            ratios = [round(y / x, 3) for x, y in zip(b, n, strict=True) if x]
            out[name] = {
                "better": better,
                "base": b,
                "new": n,
                "ratios_new_over_base": ratios,
                "median_ratio": round(statistics.median(ratios), 3) if ratios else None,
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-ref", required=True)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--only", default=",".join(FIGURES), help="modules, comma-separated")
    args = p.parse_args()
    modules = [m for m in args.only.split(",") if m]
    unknown = [m for m in modules if m not in FIGURES]
    if unknown:
        sys.exit(f"bench.pairs: unknown modules {unknown}; known: {', '.join(FIGURES)}")
    print(json.dumps(compare(args.base_ref, args.pairs, modules), indent=2))


if __name__ == "__main__":
    main()
