# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lmpipe-installed
# CPU build where there is no GPU. Elsewhere, e.g.:
#   make TORCH_INSTALL="torch --index-url https://download.pytorch.org/whl/cpu" test
TORCH_INSTALL ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
EXTRAS ?= dev

.PHONY: install demo demo-rlhf ui chromium test test-slow lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH_INSTALL)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@touch $@

demo: $(STAMP)
	$(BIN)/python -m lmpipe.pipeline pipeline=lifecycle

demo-rlhf: $(STAMP)  # after `make demo`: label -> reward model -> PPO from its SFT model
	$(BIN)/python -m lmpipe.pipeline pipeline=rlhf

ui: $(STAMP)  # the web UI on http://127.0.0.1:8000 (make ui ARGS="out_dir=runs port=8080")
	$(BIN)/python -m lmpipe.ui $(ARGS)

# The browser test drives the system's Chromium (Playwright cannot download its own here):
# Debian's package, installed as root when missing; without it that test is skipped.
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
	  || echo "chromium: not installed (needs root and apt-get); the browser test will be skipped"

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks docs
	$(BIN)/ruff format --check src tests benchmarks docs

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks docs
	$(BIN)/ruff check --fix src tests benchmarks docs

BENCHMARKS := ar_pretrain prepare sft dpo generate ar_vs_diffusion

bench: $(STAMP)  # every benchmark in turn (~25 min on 2 CPU cores); see docs/benchmarks.md
	$(BIN)/pip install -q -e ".[dev,bench]"
	@for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py || exit 1; done

clean:
	rm -rf runs outputs multirun wandb .cache .pytest_cache
