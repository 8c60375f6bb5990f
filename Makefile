# Two entry points, each doing its own set-up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OUT ?= runs/default
ARGS ?=

.PHONY: run test lint bench setup chromium

# The CPU build of torch is installed first, pinned, so that no other requirement can pull
# the multi-GB CUDA build; the local wheel directory (pip's find-links) serves it offline.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[dev,hf]"
	touch $@

setup: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/lmforge run --out $(OUT) $(ARGS)

# The browser tests drive Debian's Chromium (Playwright's own browser download is not
# reachable here); where it cannot be installed they skip and say why.
chromium:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
	  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
	  || echo "chromium could not be installed: the browser tests will skip"

test: $(BIN)/.installed chromium
	$(BIN)/python -m pytest -q $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check lmforge tests benchmarks && $(BIN)/ruff format --check lmforge tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_model.py $(ARGS)
