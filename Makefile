# SIA image service. `make run` starts the server; `make test` runs every test.
# Each target creates the virtual environment it needs on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
IMAGE  ?= sia:latest

.DEFAULT_GOAL := help
.PHONY: help install install-dev proto lint-proto dev run build test test-coverage fmt lint \
        docker-build docker-run clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/sia: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.dev: pyproject.toml $(BIN)/sia
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

node_modules/.bin/buf: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	@touch $@

install: $(BIN)/sia ## Create .venv and install the service

install-dev: $(VENV)/.dev node_modules/.bin/buf ## Install the development and test tools

proto: $(VENV)/.dev ## Regenerate src/sia/api from proto/ (code and .pyi stubs)
	$(PY) scripts/generate_proto.py

lint-proto: node_modules/.bin/buf ## buf lint on proto/
	node_modules/.bin/buf lint

dev: $(VENV)/.dev ## Run the server, restarting on changes under src/
	$(BIN)/watchfiles --filter python '$(BIN)/sia serve' src

run: $(BIN)/sia ## Run the server on its embedded defaults (no API key needed)
	$(BIN)/sia serve

build: $(VENV)/.dev ## Build the sdist and wheel into dist/
	$(PY) -m build --outdir dist .

test: install-dev ## Lint, then run every test
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest

test-coverage: install-dev ## Run every test with a coverage report
	$(BIN)/pytest --cov --cov-report=term-missing --cov-report=html

fmt: $(VENV)/.dev ## Format and auto-fix the code
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

lint: $(VENV)/.dev ## ruff, ruff format --check and mypy --strict
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy

docker-build: ## Build the container image (needs the Dockerfile; not written yet)
	@echo "docker-build: there is no Dockerfile yet; it comes with the deployment issue." >&2; exit 1

docker-run: ## Run the container image (needs the Dockerfile; not written yet)
	@echo "docker-run: there is no Dockerfile yet; it comes with the deployment issue." >&2; exit 1

clean: ## Remove the virtual environment, build outputs and caches
	rm -rf $(VENV) node_modules dist build .pytest_cache .mypy_cache .ruff_cache htmlcov .coverage
