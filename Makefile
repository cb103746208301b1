# SIA image service. `make run` starts the server; `make test` runs every test.
# Each target creates the virtual environment it needs on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
IMAGE  ?= sia:latest

.DEFAULT_GOAL := help
.PHONY: help install install-tools install-dev proto lint-proto dev run build test test-coverage fmt lint \
        docker-build docker-run clean bench bench-smoke test-quick fuzz

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

install-tools: $(VENV)/.dev node_modules/.bin/buf ## Install the development and test tools (.venv, node_modules)

install-dev: install-tools ## The same as install-tools

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

test: install-tools test-browser ## Lint, check the deployment files, then run every test
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory check-deploy
	$(BIN)/pytest

# The playground's browser tests drive Debian's chromium (never a browser Playwright downloads).
.PHONY: test-browser
test-browser: ## Install Debian's chromium for the playground's browser tests, where missing
	@scripts/install-test-browser.sh

test-quick: install-tools ## The tests without the slow ones (bench smoke, A/B, crash and restart)
	$(BIN)/pytest -m "not slow"

fuzz: install-tools ## Fuzz every RPC with 10,000 hypothesis examples each (minutes; see tests/rpc/test_fuzz.py)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/pytest -p no:cacheprovider -o timeout=0 --hypothesis-show-statistics tests/rpc/test_fuzz.py

test-coverage: install-tools ## Run every test with a coverage report
	$(BIN)/pytest --cov --cov-report=term-missing --cov-report=html

fmt: $(VENV)/.dev ## Format and auto-fix the code
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

lint: $(VENV)/.dev ## ruff, ruff format --check and mypy --strict
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: $(VENV)/.dev ## Benchmark SIA against a bare gRPC echo (~6 min); bench/results/latest.json
	$(PY) -m bench.run

bench-smoke: $(VENV)/.dev ## The benchmark in a tiny configuration (checks the harness only)
	$(PY) -m bench.run --smoke --out bench/results/tmp/smoke.json

docker-build: ## Build the container image (IMAGE, default sia:latest)
	docker build -t $(IMAGE) .

docker-run: ## Run the image on :8080 (gRPC) and :9090 (HTTP) with the settings in .env
	@test -f .env || { echo "docker-run: no .env here; start from .env.example: cp .env.example .env" >&2; exit 1; }
	docker run --rm --stop-timeout 45 -p 8080:8080 -p 9090:9090 --env-file .env $(IMAGE)

# The deployment files, checked with no Docker engine and no cluster. hadolint
# and kubernetes-validate come from the dev extra; docker-compose and promtool
# from Debian, installed by scripts/install-deploy-tools.sh where missing.
COMPOSE = $(shell command -v docker-compose >/dev/null 2>&1 && echo docker-compose || echo docker compose)
PROMTOOL = $(shell command -v promtool 2>/dev/null || echo $(BIN)/promtool)
K8S_MANIFESTS = $(filter-out k8s/kustomization.yaml,$(wildcard k8s/*.yaml))

.PHONY: deploy-tools check-deploy
deploy-tools: $(VENV)/.dev ## Install docker-compose and promtool (Debian) where missing
	@scripts/install-deploy-tools.sh $(BIN)

check-deploy: deploy-tools ## Validate the Dockerfile, compose file, k8s manifests and Prometheus files
	$(BIN)/hadolint Dockerfile
	@# .env is the developer's own (and absent in CI): check the file with .env.example in its place.
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && ln -s "$(CURDIR)"/* "$$tmp"/ \
	  && cp .env.example "$$tmp/.env" && set -x \
	  && $(COMPOSE) -f docker-compose.yml --project-directory "$$tmp" --profile replicas config -q
	$(BIN)/kubernetes-validate --strict --quiet $(K8S_MANIFESTS)
	$(BIN)/kubernetes-validate --strict --quiet --kubernetes-version 1.30.0 $(K8S_MANIFESTS)
	@for f in $(notdir $(K8S_MANIFESTS)); do \
	  grep -qE "^  - $$f$$" k8s/kustomization.yaml || { echo "k8s/kustomization.yaml does not list $$f" >&2; exit 1; }; \
	done
	$(PROMTOOL) check config monitoring/prometheus.yml
	$(PROMTOOL) check rules monitoring/alerts.yml
	$(PROMTOOL) test rules monitoring/alerts_test.yml

clean: ## Remove the virtual environment, build outputs and caches
	rm -rf $(VENV) node_modules dist build .pytest_cache .mypy_cache .ruff_cache htmlcov .coverage
