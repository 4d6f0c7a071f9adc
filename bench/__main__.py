"""``python -m bench``: run every benchmark, write bench/results.json, and regenerate the
full performance table in bench/README.md (between its ``<!-- bench:begin -->`` markers) and
the short one in README.md (between its ``<!-- bench:summary:begin -->`` markers).

Run it alone on the machine: two PyTorch processes sharing two cores slow each other ~10x."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from bench import (
    burst,
    concurrency,
    controls,
    decode_step,
    scoring,
    serve_throughput,
    structured,
    swap,
    train_corpus,
    train_throughput,
)
from bench.common import DEFAULT_MODEL, ROOT

RESULTS = ROOT / "bench" / "results.json"
README = ROOT / "README.md"
BENCH_README = ROOT / "bench" / "README.md"


def fastest(s: dict, figure: str) -> object:
    """The ratio against the notebook's fastest run (older results lack it)."""
    return s.get(f"{figure}_vs_notebook_fastest", "?")


def table(results: dict) -> str:
    d, s, t = results["decode_step"], results["serve_throughput"], results["train_throughput"]
    when = results["date"]
    low, high = s.get("notebook_sample_chars_per_s_range", ["?", "?"])
    lines = [
        f"Measured {when} on {s['machine']['cores']} CPU cores ({s['machine']['cpu']}), "
        f"torch {s['machine']['torch']}, by `make bench`; ratios are against the notebook's "
        "code re-implemented in `bench/notebook.py` and run in the same session.",
        "",
        f"The notebook's sampler is the median of ten runs ({low}–{high} chars/s in this one).",
        "",
        "| figure | CharRNN | notebook | ratio |",
        "|---|---|---|---|",
        f"| one SSE stream, chars/s | {s['one_stream_chars_per_s']:,} | "
        f"{s['notebook_sample_chars_per_s']:,} (median; fastest {high}) | "
        f"{s['one_stream_vs_notebook']}x ({fastest(s, 'one_stream')}x the fastest) |",
        f"| 32 concurrent SSE streams, aggregate chars/s | "
        f"{s['streams32_aggregate_chars_per_s']:,} | {s['notebook_sample_chars_per_s']:,} | "
        f"{s['streams32_vs_notebook']}x ({fastest(s, 'streams32')}x the fastest) |",
    ]
    b1 = d["rows"][0]
    if "int8_model_us" in b1 and "one_stream_step_us_per_char" in s:
        lines.append(
            f"| cost per character, one stream: network / sampling / scheduling + HTTP | "
            f"{b1['int8_model_us']} / {b1['sampling_us']} / "
            f"{s['one_stream_other_us_per_char']} µs (step in the server: "
            f"{s['one_stream_step_us_per_char']} µs; total {s['one_stream_us_per_char']} µs) | | |"
        )
    for n in (10, 100, 1000):
        lines.append(
            f"| time to first char, {n}-char prime, cold / cached | "
            f"{s[f'ttfc_ms_prime{n}_cold']} / {s[f'ttfc_ms_prime{n}_cached']} ms | | |"
        )
    if "burst" in results:
        b, base = results["burst"], results["burst"]["baseline_unbounded_prime_budget"]
        lines += [
            f"| burst of 32 cold 4,090-char primes: running streams' largest gap | "
            f"{b['running_largest_gap_ms']} ms | {base['running_largest_gap_ms']} ms (whole "
            f"primes first) | {b['largest_gap_vs_baseline']}x |",
            f"| the same burst: through (last first char) / median first char | "
            f"{b['burst_through_ms']} / {b['burst_first_char_ms_median']} ms | "
            f"{base['burst_through_ms']} / {base['burst_first_char_ms_median']} ms | "
            f"{b['burst_through_vs_baseline']}x |",
            f"| a 10-char prime sent {b['short_prime_sent_after_ms']:.0f} ms into the burst: "
            f"first char | {b['short_prime_mid_burst_first_char_ms']} ms | "
            f"{base['short_prime_mid_burst_first_char_ms']} ms | |",
        ]
    if (k := results.get("controls")) and "serving" in k:
        v = k["serving"]
        lines += [
            f"| one stream with presence + frequency penalties, DRY, two bans | "
            f"{v['one_stream_controls_chars_per_s']:,} chars/s | "
            f"{v['one_stream_chars_per_s']:,} (without) | {v['one_stream_controls_vs_base']}x |",
            f"| 64 streams, half with those controls: aggregate / largest gap | "
            f"{v['streams64_half_controls_chars_per_s']:,} chars/s / "
            f"{v['streams64_half_controls_largest_gap_ms']} ms | "
            f"{v['streams64_chars_per_s']:,} (all plain) | "
            f"{v['streams64_half_controls_vs_base']}x |",
            f"| `n: 8` from one request, chars/s in all (first to last character) | "
            f"{v['n8_chars_per_s']:,} | {v['n1_chars_per_s']:,} (`n: 1`) | {v['n8_vs_n1']}x |",
        ]
        for prime in (85, 331):
            if f"request_prime{prime}_n8_vs_n1" in v:
                lines.append(
                    f"| `n: 8` as the client sees it (sent to last character, one warm-up of "
                    f"a new {prime}-char prime, 300 chars a sample) | "
                    f"{v[f'request_prime{prime}_n8_chars_per_s']:,} | "
                    f"{v[f'request_prime{prime}_n1_chars_per_s']:,} (`n: 1`) | "
                    f"{v[f'request_prime{prime}_n8_vs_n1']}x |"
                )
        if "one_stream_copy_guard_chars_per_s" in v:
            lines.append(
                f"| one stream with the copy guard (`max_copy_chars: 12`) | "
                f"{v['one_stream_copy_guard_chars_per_s']:,} chars/s | "
                f"{v['one_stream_copy_guard_base_chars_per_s']:,} (without) | "
                f"{v['one_stream_copy_guard_vs_base']}x |"
            )
    if w := results.get("swap"):
        lines.append(
            f"| a model swapped under {w['streams']} streams: their largest gap | "
            f"{w['largest_gap_during_swap_ms']} ms | {w['largest_gap_before_swap_ms']} ms "
            f"(before it) | |"
        )
    lines.append(
        f"| training chars/s (batch 128, seq 100, 2x512) | {t['ours_chars_per_s']:,} | "
        f"{t['notebook_chars_per_s']:,} | {t['speedup']}x |"
    )
    if "ours_bf16_chars_per_s" in t:
        lines.append(
            f"| the same with `--precision bf16` | {t['ours_bf16_chars_per_s']:,} | "
            f"{t['notebook_chars_per_s']:,} | {t['bf16_speedup']}x |"
        )
    if t.get("ours_time_to_target_s"):
        lines.append(
            f"| wall time to the notebook's final val NLL {t['target_nll']} | "
            f"{t['ours_time_to_target_s']} s | {t['notebook_time_to_target_s']} s "
            f"(projected) | {t['time_to_target_fraction']} of it |"
        )
    if c := results.get("train_corpus"):
        mb = c["corpus_bytes"] // 1_000_000
        lines += [
            f"| `fit` on {mb} MB of Python source: peak RSS | {c['peak_rss_mb']:,} MB | "
            f"{c.get('baseline_load_peak_rss_mb', '-'):,} MB (loading it as before) | "
            f"{c.get('peak_rss_vs_baseline', '-')}x |",
            f"| the same: start to first step, cold / warm id cache | "
            f"{c['cold_first_step_s']} / {c['warm_first_step_s']} s | | |",
            f"| the same: first best checkpoint (`--eval-every 50 --eval-chars 200000`) | "
            f"{c['first_best_checkpoint_s']} s | | |",
        ]
    lines += [
        "",
        "| batch | service step (int8) | per step in calls of 16 | int8 step, eager reference | "
        "fp32 fused step | `nn.LSTM` step | service chars/s | bandwidth-bound fraction "
        "(int8 / fp32) | fraction of peak ops (int8 / fp32) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['batch']} | {r.get('int8_step_us', '-')} µs | "
            f"{r.get('int8_multi_step_us', '-')} µs | "
            f"{r.get('int8_eager_step_us', '-')} µs | {r['fused_step_us']} µs | "
            f"{r['nn_lstm_step_us']} µs | {r.get('int8_chars_per_s', 0):,} | "
            f"{r.get('int8_bandwidth_bound_fraction', '-')} / {r['bandwidth_bound_fraction']} | "
            f"{r.get('int8_ops_fraction_of_peak', '-')} / {r['flops_fraction_of_peak']} |"
        )
    if "int8_prime100_native_ms" in d:
        lines.append(
            f"\nA cold prime alone, with the service's threads (int8, "
            f"{b1.get('int8_kernels', 'native')} kernels / eager reference): 100 chars "
            f"{d['int8_prime100_native_ms']} / "
            f"{d['int8_prime100_eager_ms']} ms, 1,000 chars "
            f"{d['int8_prime1000_native_ms']} / {d['int8_prime1000_eager_ms']} ms."
        )
    lines.append(
        f"\nMachine limits measured in the same run: memory bandwidth "
        f"{d['memory_bandwidth_gb_s']} GB/s, fp32 matmul {d['peak_gflops']} GFLOP/s, "
        f"int8 matmul {d.get('peak_int8_gops', '-')} GOP/s."
    )
    return "\n".join(lines)


def summary(results: dict) -> str:
    """The README's short table: what a user of the service sees, against the notebook."""
    s, t = results["serve_throughput"], results["train_throughput"]
    rows = [
        "| figure | CharRNN | the notebook's code |",
        "|---|---|---|",
        f"| one SSE stream, chars/s | {s['one_stream_chars_per_s']:,} | "
        f"{s['notebook_sample_chars_per_s']:,} |",
        f"| 32 concurrent SSE streams, aggregate chars/s | "
        f"{s['streams32_aggregate_chars_per_s']:,} | {s['notebook_sample_chars_per_s']:,} |",
        f"| time to first char, 100-char prime, cold / cached | "
        f"{s['ttfc_ms_prime100_cold']} / {s['ttfc_ms_prime100_cached']} ms | |",
    ]
    if "burst" in results:
        b = results["burst"]
        rows.append(
            f"| running streams' largest gap while 32 cold 4,090-char primes arrive | "
            f"{b['running_largest_gap_ms']} ms | |"
        )
    if (k := results.get("controls")) and "serving" in k:
        v = k["serving"]
        rows.append(
            f"| one stream with penalties, DRY and two bans / with the copy guard, against "
            f"without | {v['one_stream_controls_vs_base']}x / "
            f"{v.get('one_stream_copy_guard_vs_base', '-')}x | |"
        )
        whole = v.get("request_prime331_n8_vs_n1", "-")
        rows.append(
            f"| `n: 8` from one request against `n: 1`, chars/s in all: decoding / as the "
            f"client sees it (one warm-up of a 331-char prime) | {v['n8_vs_n1']}x / {whole}x | |"
        )
    rows.append(
        f"| training chars/s (batch 128, seq 100, 2x512), fp32 / bf16 | "
        f"{t['ours_chars_per_s']:,} / {t.get('ours_bf16_chars_per_s', '-'):,} | "
        f"{t['notebook_chars_per_s']:,} |"
    )
    machine = s["machine"]
    return (
        f"Measured {results['date']} on {machine['cores']} CPU cores ({machine['cpu']}) by "
        "`make bench`:\n\n" + "\n".join(rows)
    )


def update_markers(path: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in path."""
    if not path.exists():
        return
    body = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"(<!-- {name}:begin -->\n).*?(\n<!-- {name}:end -->)", re.S)
    if pattern.search(body):
        path.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), body), "utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--only",
        choices=[
            "decode_step",
            "serve_throughput",
            "burst",
            "train_throughput",
            "scoring",
            "train_corpus",
            "concurrency",
            "structured",
            "controls",
            "swap",
        ],
    )
    p.add_argument("--checkpoint", default=str(DEFAULT_MODEL))
    args = p.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = {
        "decode_step": lambda: decode_step.run(),
        "serve_throughput": lambda: serve_throughput.run(args.checkpoint),
        "burst": lambda: burst.run(args.checkpoint),
        "train_throughput": lambda: train_throughput.run(),
        "scoring": lambda: scoring.run(args.checkpoint),
        "train_corpus": lambda: train_corpus.run(),
        "concurrency": lambda: concurrency.run(Path(args.checkpoint)),
        "structured": lambda: structured.run(args.checkpoint),
        "controls": lambda: controls.run(),
        "swap": lambda: swap.run(Path(args.checkpoint)),
    }
    for name, fn in runs.items():
        if args.only and name != args.only:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = fn()
        print(json.dumps(results[name], indent=2), flush=True)
    results["date"] = time.strftime("%Y-%m-%d")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if "concurrency" in results:
        for path in (BENCH_README, README):
            update_markers(path, "concurrency", concurrency.table(results["concurrency"]))
    if all(k in results for k in runs):
        update_markers(BENCH_README, "bench", table(results))
        update_markers(README, "bench:summary", summary(results))
        print(table(results))


if __name__ == "__main__":
    main()
