# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Set-up installs torch==2.13.0 first (on a CPU-only machine pip takes the CPU build that lies on
# disk; a bare `torch` requirement would pull a multi-GB CUDA build), then the project itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup demo lint test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/grpokit train

# ruff (pyflakes, bugbear) and mypy on src/, configured in pyproject.toml
lint: setup
	$(BIN)/ruff check src
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q --durations=25 tests

bench: setup
	$(BIN)/python benchmarks/rollout.py

clean:
	rm -rf $(VENV) runs
