# kleave: `make demo` runs kleave locally; `make test` runs everything CI runs.
# Everything the targets need is installed here: a virtualenv from PyPI (with torch for the
# workers' tests: PyPI's Linux wheel is the CUDA build and runs on the CPU too), the control
# plane built from Go modules into ~/.cache/kleave (or $KLEAVE_CACHE), Prometheus from Debian.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: help install prometheus control-plane lint format unit e2e test demo demo-down crds crds-check bench clean

help:
	@echo "make demo      bring up a local cluster, run the operator, apply the examples"
	@echo "make demo-down stop the demo cluster and operator"
	@echo "make test      lint + unit + end-to-end tests (what CI runs)"
	@echo "make lint      ruff + mypy;  make crds  regenerate crds/ from src/kleave/api"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,workers]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "==> installing prometheus (Debian package)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

control-plane: $(STAMP)
	$(BIN)/kleave dev-cluster build

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

unit: $(STAMP)
	$(BIN)/pytest tests -q $(PYTEST_ARGS)

e2e: $(STAMP) control-plane prometheus
	$(BIN)/pytest e2e -q $(PYTEST_ARGS)

test: lint unit e2e

crds: $(STAMP)
	$(BIN)/kleave crds generate

crds-check: $(STAMP)
	$(BIN)/kleave crds check

demo: $(STAMP) control-plane prometheus
	$(BIN)/kleave demo up

demo-down: $(STAMP)
	$(BIN)/kleave demo down

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build src/*.egg-info
