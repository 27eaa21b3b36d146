# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv/ first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a CPU-only machine take the CPU wheel (never a multi-GB CUDA build). Where a GPU is present,
# install your CUDA torch into .venv first, or override: make TORCH_SPEC='torch==2.13.0' ...
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup browser demo lint format test clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev,ray,text]"
	touch $(STAMP)

demo: setup
	$(BIN)/diffcircuit run --out runs/demo

# The report's browser test needs headless Chromium: installed from Debian where it is missing and
# apt-get can run (as root); elsewhere that one test skips, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  command -v google-chrome >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	  echo "note: no Chromium and no root apt-get: the report's browser test will be skipped"

# ruff (lint, and the formatting check) and mypy on the public API's modules: the habits `make test` keeps
lint: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix src tests benchmarks examples
	$(BIN)/ruff format src tests benchmarks examples

test: setup browser lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
