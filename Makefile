# icon_lightning — `make help` lists the targets.
# GPU=1 installs the `gpu` extra (faiss-gpu) instead of `cpu` (faiss-cpu); the two never share a venv.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRA  := $(if $(GPU),gpu,cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install test test-fast demo demo-cifar10 lint format clean bench-data bench-kernel bench-train \
	bench-clustering bench-fit bench-ddp-memory extract-cifar10 reproduce-imagenet gpu-check

help: ## Show this help
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

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

demo: install ## The main job: I-Con on frozen EfficientNet-Lite0 features of digits (then raw pixels), beside k-means and spectral
	$(BIN)/python -m icon_lightning.demo

CIFAR10 ?=
demo-cifar10: install ## The demo on a local CIFAR-10: CIFAR10=<torchvision root | image folder | .tar>
	@test -n "$(CIFAR10)" || { echo "demo-cifar10: set CIFAR10=<path> (torchvision's cifar-10-batches-py parent, an image folder, or a .tar)"; exit 2; }
	$(BIN)/python -m icon_lightning.demo --cifar10 "$(CIFAR10)"

SHARED ?= ../shared/data

extract-cifar10: install ## Cache CIFAR-10 test EfficientNet-Lite0 features (128 px) from the shared tar, k-NN agreement
	$(BIN)/python -m icon_lightning.data --tar $(SHARED)/cifar10/cifar10_jpeg_test.tar --split test --image-size 128 --k 10

bench-data: install ## k-NN and feature-extraction speed -> benchmarks/results/{knn,extraction}_<device>.json
	$(BIN)/python -m benchmarks.knn
	$(BIN)/python -m benchmarks.extraction --tar $(SHARED)/cifar10/cifar10_jpeg_test.tar --split test

# Long-tailed versions of the benchmark's sets (class sizes falling geometrically by 10x or 100x, one subset per seed;
# README "Results"): `make bench-clustering LONG_TAILED=1`, `make bench-fit LONG_TAILED=1`, or name some of them in
# CLUSTERING_DATASETS / FIT_DATASETS.
LONG_TAILED_DATASETS := digits_lt10 digits_lt100 cifar10_test_lt10 cifar10_test_lt100 mnist_test_lt10 \
	mnist_test_lt100 fashion_mnist_test_lt10 fashion_mnist_test_lt100
FIT_DATASETS ?= $(if $(LONG_TAILED),$(LONG_TAILED_DATASETS),digits cifar10_test fashion_mnist_train)
bench-fit: install ## converged default `icon fit` wall time, steps, memory, accuracy (FIT_DATASETS; LONG_TAILED=1: the long-tailed sets) -> benchmarks/results/fit_<dataset>.json
	flock /tmp/icon-bench.lock $(BIN)/python -m benchmarks.fit $(foreach d,$(FIT_DATASETS),--dataset $(d)) \
		$(BENCH_FIT_ARGS)
	$(BIN)/python -m benchmarks.fit --table

bench-ddp-memory: install ## memory of cached views in a 2-process gloo run, before/now -> benchmarks/results/ddp_memory_cpu.json
	$(BIN)/python -m benchmarks.ddp_memory

bench-kernel: install ## cluster-kernel speed vs a plain matmul -> benchmarks/results/cluster_kernel_<device>.json
	$(BIN)/python -m benchmarks.cluster_kernel

BENCH_TRAIN_ARGS ?= --threads 1
bench-train: install ## sparse vs dense step over B x K x H, FLOP/stream bounds, memory -> benchmarks/results/train_step_<device>.json
	$(BIN)/python -m benchmarks.train_step $(BENCH_TRAIN_ARGS)

gpu-check: ## The prepared GPU check (< 8 min, one GPU) -> benchmarks/results/gpu_check_cuda.json (+ $OUT); no install step
	bash benchmarks/gpu_check.sh

CLUSTERING_DATASETS ?= $(if $(LONG_TAILED),$(LONG_TAILED_DATASETS),digits cifar10_test cifar10_train_test \
	fashion_mnist_test mnist_test)
bench-clustering: install ## every method x 3 seeds per dataset (CLUSTERING_DATASETS; LONG_TAILED=1: digits_lt10 ... fashion_mnist_test_lt100) -> benchmarks/results/clustering_<dataset>.json
	for d in $(CLUSTERING_DATASETS); do OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.clustering --dataset $$d \
		--cifar10-tar-dir $(SHARED)/cifar10 || exit 1; done
	$(BIN)/python -m benchmarks.clustering --table --readme
	$(BIN)/python -m benchmarks.summary --docs

IMAGENET_ROOT ?=
MODEL ?= s14
DINOV2_CHECKPOINT ?=
reproduce-imagenet: install ## The paper's ImageNet-1K protocol: IMAGENET_ROOT=<dir> MODEL=s14|b14|l14 (GPUs)
	$(BIN)/python -m experiments.imagenet_dinov2.reproduce --root "$(IMAGENET_ROOT)" --model $(MODEL) \
		$(if $(DINOV2_CHECKPOINT),--checkpoint "$(DINOV2_CHECKPOINT)",)

LINTED := icon_lightning tests benchmarks experiments

lint: install ## ruff check and format check
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

format: install ## ruff format and autofix
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

clean: ## Remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info lightning_logs
