# Two commands set everything up on a fresh machine:
#   make serve   install the runtime dependencies, then serve the shipped model on
#                http://127.0.0.1:8000
#   make test    add the dev tools (pytest, ruff, Playwright, lm-eval, ...), then run lint and
#                the test suite
#   make model   retrain models/alice.pt from ALICE (Project Gutenberg ebook #11), if present
#   make finetune DATA=your.txt   continue training models/alice.pt on your text (README,
#                "Your own text")
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per layer: `make serve` never pays for the dev tools, and `make test` after it only
# adds them.
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev serve test test-fast lint bench soak model finetune docker-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

serve: install
	$(PY) -m app

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install-dev lint
	$(PY) -m pytest

# In-process tests only: no server, no other process (tests/conftest.py enforces the marker).
test-fast: install-dev
	$(PY) -m pytest -m "not slow and not e2e"

bench: install-dev
	$(PY) -m bench

# 60 s of mixed traffic (JSON, SSE hang-ups, OpenAI, /score, hostile inputs) against a real
# server: fails on any 5xx, a stream without `done`, or memory growth (scripts/soak.py).
SOAK_SECONDS ?= 60
soak: install-dev
	$(PY) scripts/soak.py --seconds $(SOAK_SECONDS)

# The shipped model's recipe (models/README.md). The run goes to runs/alice/ and its best
# checkpoint, metrics and curve are copied over models/ only when it finishes.
ALICE ?= ../shared/data/alice.txt
MODEL_RECIPE ?= --batch-size 64 --seq-len 100 --hidden 512 --layers 2 --embed 64 \
	--dropout 0.45 --embed-dropout 0.2 --weight-decay 0.3 \
	--weight-drop 0.3 --locked-dropout --ar 2 --tar 1 \
	--schedule onecycle --lr 4e-3 --clip 5 --precision bf16 --epochs 40 --val-frac 0.1 \
	--seed 0 --threads 1

model: install
	@test -f "$(ALICE)" || { echo "make model: $(ALICE) not found; download Project \
	Gutenberg ebook #11 (Alice's Adventures in Wonderland, plain text UTF-8) and run \
	make model ALICE=path/to/alice.txt" >&2; exit 2; }
	rm -rf runs/alice
	$(PY) -m training fit --data "$(ALICE)" --out runs/alice/alice.pt $(MODEL_RECIPE) --keep-index
	cp runs/alice/alice.pt runs/alice/alice.metrics.jsonl runs/alice/alice.loss.png \
		runs/alice/alice.index.npz models/
	$(PY) -m training evaluate --checkpoint models/alice.pt --data "$(ALICE)" --tail-frac 0.1
	$(PY) -m training evaluate --checkpoint models/alice.pt --data "$(ALICE)" --tail-frac 0.1 \
		--decode int8

# Your own text in minutes: continue training INIT on DATA for MINUTES (the budget recipe),
# the vocabulary grown by DATA's new characters; the checkpoint, its curve and its text index
# go to OUT (serve it with CHARRNN_MODELS=mine=OUT).
INIT ?= models/alice.pt
MINUTES ?= 5
FT_NAME = $(basename $(notdir $(DATA)))
FT_OUT = $(or $(OUT),runs/$(FT_NAME)/$(FT_NAME).pt)
finetune: install
	@test -n "$(DATA)" -a -f "$(DATA)" || { echo "make finetune: DATA=path/to/text.txt is \
	needed (a UTF-8 text file)" >&2; exit 2; }
	$(PY) -m training fit --init-from "$(INIT)" --data "$(DATA)" --out "$(FT_OUT)" \
		--max-minutes $(MINUTES) --keep-index
	$(PY) -m training evaluate --checkpoint "$(FT_OUT)" --data "$(DATA)" --tail-frac 0.1
	$(PY) -m training evaluate --checkpoint "$(FT_OUT)" --data "$(DATA)" --tail-frac 0.1 \
		--decode int8

docker-smoke:
	bash scripts/docker_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
