# icon_lightning — `make help` lists the targets.
# GPU=1 installs the `gpu` extra (faiss-gpu) instead of `cpu` (faiss-cpu); the two never share a venv.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRA  := $(if $(GPU),gpu,cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-fast demo lint format clean bench-data bench-kernel extract-cifar10

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv and install -e .[cpu,dev] (or .[gpu,dev] with GPU=1)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	@# faiss-cpu and faiss-gpu install the same module: remove whichever is there before switching.
	$(BIN)/python -m pip uninstall -q -y faiss-cpu faiss-gpu >/dev/null 2>&1 || true
	rm -f $(VENV)/.installed-*
	$(BIN)/python -m pip install -q -e ".[$(EXTRA),dev]"
	touch $@

test: install ## Run the test suite (CPU; slow tests included)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install ## Run the test suite without tests marked slow
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: install ## The main job: I-Con clusterer on scikit-learn digits beside k-means
	$(BIN)/python -m icon_lightning.demo

SHARED ?= ../shared/data

extract-cifar10: install ## Cache CIFAR-10 test EfficientNet-Lite0 features (128 px) from the shared tar, k-NN agreement
	$(BIN)/python -m icon_lightning.data --tar $(SHARED)/cifar10/cifar10_jpeg_test.tar --split test --image-size 128 --k 10

bench-data: install ## k-NN and feature-extraction speed -> benchmarks/results/{knn,extraction}_<device>.json
	$(BIN)/python -m benchmarks.knn
	$(BIN)/python -m benchmarks.extraction --tar $(SHARED)/cifar10/cifar10_jpeg_test.tar --split test

bench-kernel: install ## cluster-kernel speed vs a plain matmul -> benchmarks/results/cluster_kernel_<device>.json
	$(BIN)/python -m benchmarks.cluster_kernel

lint: install ## ruff check and format check
	$(BIN)/ruff check icon_lightning tests
	$(BIN)/ruff format --check icon_lightning tests

format: install ## ruff format and autofix
	$(BIN)/ruff format icon_lightning tests
	$(BIN)/ruff check --fix icon_lightning tests

clean: ## Remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info lightning_logs
