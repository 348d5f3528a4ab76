# Two entry points do all the set-up on a fresh machine:
#   make sample   -> creates .venv, installs the package, samples a grid from the bundled model
#   make test     -> creates .venv, installs the package with the test + onnx + openvino extras, runs ruff (lint and
#                    format check), lint-imports (the layering contracts in pyproject.toml) and the default
#                    pytest suite (everything not marked slow: a few minutes)
# Both are idempotent: a second run only re-installs when pyproject.toml changed.
# `make test-slow` runs the tests marked slow (quality, 1000-step chains, full exports); CI runs it after
# `make test` as a separate step with its own time budget (SLOW_BUDGET_S).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SLOW_BUDGET_S ?= 1500

# A machine with an NVIDIA driver gets the CUDA build PyPI serves by default; a CPU machine pins the
# CPU build that our CI machines hold on local disk (a plain `torch` there would pull a multi-GB CUDA build).
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_NVIDIA),1)
TORCH_SPEC ?= torch>=2.4
else
TORCH_SPEC ?= torch==2.13.0
endif

.PHONY: sample test test-isa test-slow lint wheel-check bench setup clean

$(VENV)/.base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install -q -e ".[test,onnx,openvino]"
	touch $@

setup: $(VENV)/.base

sample: $(VENV)/.base
	$(VENV)/bin/ddpm-fast sample $(ARGS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# A wheel in a fresh virtual environment, used from a temporary directory: the installed package (not this
# source tree) samples and imports its kernels and export parts.
wheel-check: $(VENV)/.base
	set -e; tmp=$$(mktemp -d); \
	$(PIP) wheel -q --no-deps -w $$tmp/dist . ; \
	$(PYTHON) -m venv $$tmp/venv; \
	$$tmp/venv/bin/python -m pip install -q "$(TORCH_SPEC)" $$tmp/dist/ddpm_fast-*.whl; \
	cd $$tmp && venv/bin/ddpm-fast sample --num 4 --steps 10 --out wheel.png --quiet && \
	venv/bin/python -c "import ddpm_fast.kernels, ddpm_fast.export, ddpm_fast.cli; print('wheel ok:', ddpm_fast.kernels.__file__)"; \
	rm -rf $$tmp

test: lint
	$(PY) -m pytest -q -m "not slow" --durations=10 $(PYTEST_ARGS)

# The tests whose bounds are about float32 rounding, again under another ATen vector kernel set (another
# summation order): `default`, the scalar kernels, the farthest from any vector ISA. A bound that holds only
# for one processor's kernels fails here, on the developer's machine, before CI meets another CPU; more sets:
# `make test-isa ISA_CAPS="default avx2"` (about 3.5 min each on 2 cores, plus test_openvino.py's 13 s; the
# schedule tests hold the linear betas to one set of bits, which a tuned table's schedule digest names).
ISA_TESTS ?= tests/test_kernels.py tests/test_engine.py tests/test_guidance.py tests/test_solvers.py \
	tests/test_adm.py tests/test_unet_diffusers.py tests/test_onnx.py tests/test_cuda_proofs.py \
	tests/test_openvino.py tests/test_schedule.py
ISA_CAPS ?= default
test-isa: $(VENV)/.dev
	set -e; for cap in $(ISA_CAPS); do echo "== ATEN_CPU_CAPABILITY=$$cap"; \
	ATEN_CPU_CAPABILITY=$$cap $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) $(ISA_TESTS); done

test-slow: $(VENV)/.dev
	timeout --signal=INT $(SLOW_BUDGET_S) $(PY) -m pytest -q -m slow --durations=10 $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(VENV)/bin/ddpm-fast bench $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
