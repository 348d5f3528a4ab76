# Two entry points do all the set-up on a fresh machine:
#   make sample   -> creates .venv, installs the package, samples a grid from the bundled model
#   make test     -> creates .venv, installs the package with test + onnx extras, runs ruff and pytest
# Both are idempotent: a second run only re-installs when pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# A machine with an NVIDIA driver gets the CUDA build PyPI serves by default; a CPU machine pins the
# CPU build that our CI machines hold on local disk (a plain `torch` there would pull a multi-GB CUDA build).
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_NVIDIA),1)
TORCH_SPEC ?= torch>=2.4
else
TORCH_SPEC ?= torch==2.13.0
endif

.PHONY: sample test lint bench setup clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e ".[test,onnx]"
	touch $@

setup: $(VENV)/.base

sample: $(VENV)/.base
	$(VENV)/bin/ddpm-fast sample $(ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(VENV)/.dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(VENV)/bin/ddpm-fast bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
