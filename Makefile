# The two commands a new user runs are `make demo` and `make test`; both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint unit integration bench bench-report mosquitto prometheus container-tools clean

setup: $(STAMP) mosquitto prometheus

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11 or newer is needed"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all,test]'
	touch $(STAMP)

# Mosquitto is the broker of the demo and the tests; Debian ships it (curl: the README's tour).
mosquitto:
	@command -v mosquitto >/dev/null && command -v mosquitto_pub >/dev/null && command -v curl >/dev/null || { \
	  echo "installing mosquitto with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients curl >/dev/null; }

# Prometheus scrapes the demo's service, agents and sync process and evaluates the alert rules of
# deploy/observability (promtool comes with it). The demo runs its own on a free loopback port.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  echo "installing prometheus with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# buildah, podman, vfs storage, the Debian base image of bentofile.yaml, and promtool, for the
# bentos tests and `bentoml containerize --backend buildah` (idempotent; seconds when done).
container-tools: $(STAMP)
	$(BIN)/python -m tools.container setup --promtool $(BIN)

demo: setup
	$(BIN)/edgebento demo --workdir build/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q -p no:cacheprovider tests/unit/test_import_rules.py

# The suite runs on every core, up to 4 workers, each test module whole on one worker (its
# module-scoped services and images are made once); `pytest FILE` alone runs in one process.
PARALLEL := -n auto --maxprocesses 4 --dist loadfile

unit: $(STAMP)
	$(BIN)/pytest $(PARALLEL) tests/unit

integration: setup
	$(BIN)/pytest $(PARALLEL) tests/integration

test: setup lint container-tools
	$(BIN)/pytest $(PARALLEL) tests

# Runs every benchmark, then writes docs/benchmarks.md and the README's table from the results.
bench: setup
	$(BIN)/python -m pip install --quiet -e '.[all,test,bench]'
	$(BIN)/python -m benchmarks

# Only the rewriting, from the results already in benchmarks/results/.
bench-report: $(STAMP)
	$(BIN)/python -m benchmarks report

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
