# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv/ first (once).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a CPU-only machine take the CPU wheel (never a multi-GB CUDA build). Where a GPU is present,
# install your CUDA torch into .venv first, or override: make TORCH_SPEC='torch==2.13.0' ...
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean
setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/diffcircuit run --out runs/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
