# Two set-up-free commands: `make pipeline` (the main job) and `make test`.
# Both bootstrap .venv from the pinned lock (requirements.txt, CPU torch 2.13.0) on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# DeepSpeed's CPU ops are JIT-built once and cached here, not on every run.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export PYTHONHASHSEED := 0
export PREFECT_HOME ?= $(CURDIR)/.prefect
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
# DVC stage commands call `python`: make it the venv's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: pipeline test lint bench search flow ui serve prometheus prometheus-install clean

$(BIN)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

pipeline: $(BIN)/.installed
	$(BIN)/dvc repro
	$(BIN)/python -m moeops.summary

test: $(BIN)/.installed prometheus-install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=15 tests

flow: $(BIN)/.installed
	$(BIN)/python -m flows.pipeline

# A real Prefect server (SQLite in .prefect/, or Postgres via PREFECT_SERVER_DATABASE_CONNECTION_URL) on
# 127.0.0.1:4200, serving the scheduled `pipeline/retrain` deployment. Ctrl-C stops both.
ui: $(BIN)/.installed
	$(BIN)/python -m flows.retrain --server

# The local registry's champion (after `make flow` or `make pipeline` + promote) behind the OpenAI-compatible
# API on 127.0.0.1:8000 (params.yaml serve:); follows the champion alias (hot reload). Ctrl-C drains and stops.
serve: $(BIN)/.installed
	$(BIN)/python -m moeops serve

# Debian's prometheus + prometheus-pushgateway (the tests, `make prometheus` and the rollout flow run the real
# ones): a no-op once both are on PATH; else apt-get as root (about 26 MB). policy-rc.d (exit 101, put there only
# for the install when the system has none) keeps the packages' postinst from starting system services on
# 9090/9091.
PROMETHEUS_PACKAGES := prometheus prometheus-pushgateway
prometheus-install:
	@command -v prometheus >/dev/null && command -v prometheus-pushgateway >/dev/null && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "error: prometheus is not installed: run 'sudo apt-get install $(PROMETHEUS_PACKAGES)' (Debian/Ubuntu)" \
	    "or put both binaries on PATH" >&2; exit 2; fi; \
	rc=/usr/sbin/policy-rc.d; added=; \
	if [ ! -e $$rc ]; then printf '#!/bin/sh\nexit 101\n' > $$rc && chmod +x $$rc && added=1; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q --no-install-recommends $(PROMETHEUS_PACKAGES) >/dev/null \
	  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(PROMETHEUS_PACKAGES) >/dev/null; }; \
	status=$$?; [ -z "$$added" ] || rm -f $$rc; exit $$status

# Prometheus on 127.0.0.1:9090 scraping the server (params.yaml serve.host:port; `make serve`) and the
# Pushgateway on 127.0.0.1:9091 (the quality probe's results), both in the foreground, data in .cache/prometheus.
# Ctrl-C stops both.
prometheus: $(BIN)/.installed prometheus-install
	$(BIN)/python -m moeops.prometheus

bench: $(BIN)/.installed
	$(BIN)/python -m bench.run

# params.yaml search: one `dvc exp run --queue` per grid point in a fresh clone of HEAD (commit first), `dvc queue
# start`, compared with `dvc exp show` / `dvc plots diff`: bench/results/arch_search.{json,png}. Prepare comes from
# this checkout's DVC cache when it ran here.
search: $(BIN)/.installed
	$(BIN)/python -m bench.arch_search --cache .dvc/cache

lint: $(BIN)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf data models checkpoints metrics reports dvclive plots
