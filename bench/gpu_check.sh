#!/usr/bin/env bash
# Every GPU check in one run, well under 8 minutes on an H200 (each step has its own timeout;
# their sum is the worst case). Results go to $OUT (default bench/gpu) as JSON and text, with
# one summary, $OUT/summary.json; the exit status is 1 if any check failed. Needs the project
# installed (pip install -e '.[dev]') and the Alice text at ../shared/data/alice.txt or $DATA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu}
DATA=${DATA:-../shared/data/alice.txt}
PY=${PY:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RESULTS="$OUT/checks.tsv"
: >"$RESULTS"

# check NAME SECONDS OUTFILE COMMAND...: run it with a timeout, keep its output, record pass/fail.
check() {
  local name=$1 limit=$2 out=$3
  shift 3
  local t0=$SECONDS status
  timeout "$limit" "$@" >"$out" 2>"$out.err"
  status=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$out" >>"$RESULTS"
  echo "gpu_check: $name: exit $status in $((SECONDS - t0)) s -> $out"
}

device() {
  check device 60 "$OUT/gpu.txt" $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$OUT/gpu.txt" 2>/dev/null || true
}

# -- Decode and serving (issue 15) ---------------------------------------------------------
# The CUDA tests (graphs replay the eager step bit for bit, every bucket, rows independent of
# their bucket, two models capturing from two threads), the decode step at batch 1..1024, and
# the serving checks over HTTP: two models warming up together on one GPU, every bucket
# captured, one seed alone and among 200 streams giving the same text, 256 concurrent SSE
# streams' aggregate chars/s (bench/gpu_serving.py).
decode_and_serving() {
  check cuda_tests 150 "$OUT/cuda_tests.txt" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_graphs.py
  check decode_step 90 "$OUT/decode_step.json" $PY -m bench.decode_step --device cuda --batches 1 8 32 128 512 1024
  check gpu_serving 150 "$OUT/gpu_serving.json" $PY -m bench.gpu_serving --checkpoint models/alice.pt
}

training() {
  # Training precision (issue 14): the LSTM's dtype under each --precision, 300 steps each with
  # a finite, falling loss, and an interrupted-and-resumed run ending where the whole one did.
  check training_precision 300 "$OUT/training_precision.txt" $PY -m pytest -q -p no:cacheprovider tests/test_training_precision.py
  check train_throughput 180 "$OUT/train_throughput.json" $PY -m bench.train_throughput --device cuda --data "$DATA" --steps 20
}

summary() {
  $PY - "$RESULTS" "$OUT/summary.json" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1]) if line.strip()]
checks = {name: {"exit": int(status), "seconds": int(s), "output": out} for name, status, s, out in rows}
summary = {"passed": all(c["exit"] == 0 for c in checks.values()),
           "failed": [n for n, c in checks.items() if c["exit"] != 0], "checks": checks}
for name in ("gpu_serving",):
    try:
        summary[name] = json.load(open(checks[name]["output"]))
    except (KeyError, OSError, ValueError):
        pass
json.dump(summary, open(sys.argv[2], "w"), indent=2)
print(json.dumps({k: summary[k] for k in ("passed", "failed")}))
sys.exit(0 if summary["passed"] else 1)
EOF
}

device
decode_and_serving
training
summary
