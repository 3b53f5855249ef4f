# genrecal developer entry points. Each target provisions .venv on a fresh machine first:
#   python3 -m venv .venv, then the CPU build of torch (before anything that depends on torch,
#   so pip never resolves the CUDA build), then `pip install -e '.[test]'`. A stamp file inside
#   .venv makes the install re-run only when pyproject.toml changes.
#
# The CPU wheel comes from pip's configured sources (here: find-links /opt/wheels). Elsewhere:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make test

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# The local version label pins the CPU build: no CUDA wheel can satisfy it.
TORCH_SPEC ?= torch==2.13.0+cpu
# Seconds per test (pytest-timeout); end-to-end tests are marked slow and take minutes.
TEST_TIMEOUT ?= 900
PYTEST_ARGS ?=

BIN := $(VENV)/bin
TORCH_STAMP := $(VENV)/.torch-installed
INSTALL_STAMP := $(VENV)/.genrecal-installed
PYTEST := $(BIN)/python -m pytest --timeout=$(TEST_TIMEOUT)

.PHONY: help venv demo test test-fast

help:
	@echo "make demo       run the demo pipeline end to end (tiny models, CPU)"
	@echo "make test       the whole test suite, slow tests included (what CI runs)"
	@echo "make test-fast  the test suite without the tests marked slow"
	@echo "make venv       only create / update $(VENV)"

venv: $(INSTALL_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(TORCH_STAMP): | $(BIN)/python
	$(BIN)/python -m pip install --only-binary=:all: '$(TORCH_SPEC)'
	touch $@

$(INSTALL_STAMP): pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

demo: $(INSTALL_STAMP)
	$(BIN)/genrecal run demo

test: $(INSTALL_STAMP)
	$(PYTEST) $(PYTEST_ARGS)

test-fast: $(INSTALL_STAMP)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)
