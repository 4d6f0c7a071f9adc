#!/usr/bin/env bash
# Every GPU check in one run (well under 10 minutes on an H200): the CUDA-only tests, the
# training precision checks, training throughput at the notebook's settings, the decode step
# at batch 1..1024 and the serving benchmark, each saved as JSON under $OUT (default
# bench/gpu). Needs the project installed (pip install -e '.[dev]') and the Alice text at
# ../shared/data/alice.txt or --data.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu}
DATA=${DATA:-../shared/data/alice.txt}
PY=${PY:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/gpu.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/gpu.txt" || true
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_model.py tests/test_sampling.py | tee "$OUT/cuda_tests.txt"
# Training precision: the LSTM's dtype under each --precision, 300 steps each with a finite,
# falling loss, and an interrupted-and-resumed run ending where the whole one did.
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_training_precision.py | tee "$OUT/training_precision.txt"
timeout 120 $PY -m bench.decode_step --device cuda --batches 1 8 32 128 512 1024 | tee "$OUT/decode_step.json"
timeout 180 $PY -m bench.train_throughput --device cuda --data "$DATA" --steps 20 | tee "$OUT/train_throughput.json"
timeout 150 $PY -m bench.serve_throughput --checkpoint models/alice.pt | tee "$OUT/serve_throughput.json"
echo "gpu_check: all done; results in $OUT"
