# make demo: set up .venv and run the built-in demo end to end (offline, CPU, a few minutes at most)
# make test: set up .venv and run the test suite
# make test-fast: the same without the tests marked slow (end to end, torchrun, signals)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: a bare `torch` requirement would pull a multi-GB build.
# pip's default wheel is the CUDA build on Linux with a GPU driver, the CPU build elsewhere;
# override with e.g. `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"`.
TORCH_SPEC ?= torch==2.13.0
# Every other package at the version the tests pass with (constraints.txt); CONSTRAINTS= drops the pins.
CONSTRAINTS ?= constraints.txt
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: setup demo test test-fast bench clean-demo

$(BIN)/.kava-installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q $(PIN) -e ".[dev]"
	touch $@

setup: $(BIN)/.kava-installed

demo: setup
	$(BIN)/python -m kava_demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python bench/bench_extract.py

clean-demo:
	rm -rf data_cache/demo
