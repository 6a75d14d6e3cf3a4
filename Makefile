# Everything goes through a local virtual environment (.venv), created on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Tests and the demo never reach for the network: pretrained downloads fail at once, W&B stays local.
OFFLINE := HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
# Test worker processes (pytest-xdist); a test module stays on one worker. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadscope

.PHONY: help install demo test test-fast lint format bench bench-gpu clean clean-logs

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install anomret with its dev extras

demo: $(STAMP) ## MRAD-TF end to end on the built-in synthetic data (CPU, about 10 s: experiments/benchmarks/demos.md)
	$(OFFLINE) $(BIN)/python -m anomret.train +experiment=demo

test: $(STAMP) ## The whole test suite
	@$(OFFLINE) $(BIN)/python -m pytest $(XDIST); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: the suite is missing or deselected" >&2; fi; \
	exit $$status

test-fast: $(STAMP) ## The fast tier: pure functions and components (no entry-point runs, no processes)
	$(OFFLINE) $(BIN)/python -m pytest $(XDIST) -m "not integration"

lint: $(STAMP) ## ruff lint + format check, mypy (settings in pyproject.toml)
	$(BIN)/ruff check src tests experiments
	$(BIN)/ruff format --check src tests experiments
	$(BIN)/mypy

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix src tests experiments
	$(BIN)/ruff format src tests experiments

bench: $(STAMP) ## CPU benchmarks (metrics, retrieval, encoders, start-up, demos); figures go to experiments/benchmarks/
	$(OFFLINE) $(BIN)/python experiments/benchmarks/bench_startup.py
	$(OFFLINE) $(BIN)/python experiments/benchmarks/bench_demos.py
	$(OFFLINE) $(BIN)/python experiments/benchmarks/bench_metrics.py
	$(OFFLINE) $(BIN)/python experiments/benchmarks/bench_retrieval.py
	$(OFFLINE) $(BIN)/python experiments/benchmarks/bench_encoders.py

bench-gpu: $(STAMP) ## GPU benchmark, under 5 minutes on one H200 (RAD, MRAD-TF, MRAD-FT/CLIP epochs, kernel) -> experiments/benchmarks/gpu.md
	$(OFFLINE) $(BIN)/python experiments/benchmarks/bench_gpu.py

clean-logs: ## Delete run directories under logs/
	rm -rf logs

clean: ## Delete caches (keeps .venv, data and logs)
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
	rm -rf .pytest_cache .ruff_cache .mypy_cache .benchmarks
