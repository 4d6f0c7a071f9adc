# Two commands set everything up on a fresh machine:
#   make serve   install the runtime dependencies, then serve the shipped model on
#                http://127.0.0.1:8000
#   make test    add the dev tools (pytest, ruff, Playwright, lm-eval, ...), then run lint and
#                the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# One stamp per layer: `make serve` never pays for the dev tools, and `make test` after it only
# adds them.
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev serve test test-fast lint bench docker-smoke clean

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

docker-smoke:
	bash scripts/docker_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
