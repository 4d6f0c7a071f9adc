# Two commands set everything up on a fresh machine:
#   make serve   install, then serve the shipped model on http://127.0.0.1:8000
#   make test    install (with dev tools), then run lint and the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast lint bench docker-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(PY) -m app

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install lint
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(PY) -m bench

docker-smoke:
	bash scripts/docker_smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
