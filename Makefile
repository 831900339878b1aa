# The two commands (see README):  make run   |   make test
# Each creates .venv and installs the project on first use (and again when pyproject.toml changes).

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 are the pinned, tested pair (served from local disk on
# this project's machines). pip's progress noise about absent local index folders is filtered.
TORCH := torch==2.14.1 torchvision==0.29.1
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
PIPELINE ?= pipelines/cifar.yaml
ARGS ?=

.PHONY: setup run test test-slow clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH) 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) -e '.[test]' $(TORCH) 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/python -c "import torch, torchvision, nvidia.dali, webdataset"
	touch $@

run: setup
	$(BIN)/cgan-pipe run $(PIPELINE) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
