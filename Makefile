# Two commands matter: `make run` (build the whole pipeline) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The default MLflow store: a SQLite file at the project root, by absolute path so that
# queued DVC experiments (run in temporary copies) log into the same store.
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: help setup run test test-fast lint format ui bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev extra (quick when done)

run: setup  ## fetch, normalize, train and evaluate: dvc repro
	$(BIN)/dvc repro

test: setup  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest

test-fast: setup  ## the fast tests only
	$(BIN)/python -m pytest -m "not slow"

lint: setup  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: setup  ## open the MLflow UI on the tracking store, on $(HOST):$(PORT)
	$(BIN)/mlflow ui --backend-store-uri "$(MLFLOW_TRACKING_URI)" --host $(HOST) --port $(PORT)

bench: setup  ## training throughput against the common tutorial baseline
	$(BIN)/python benchmarks/train_throughput.py
