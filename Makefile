# Every target creates .venv if missing. torch is pinned first so that pip takes
# the CPU wheel available on these machines instead of a multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: demo test bench lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	touch $@

$(STAMP): $(VENV)/.torch pyproject.toml
	$(BIN)/pip install -q -e '.[dev,hf]'
	touch $@

demo: $(STAMP)
	$(BIN)/lyoncompress demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# CPU benchmarks; benchmarks/memory.py (2 GB of disk, minutes) and
# benchmarks/gpu_checks.sh (GPU tests + ks_matmul_gpu.py, needs a GPU) are run by hand.
bench: $(STAMP)
	$(BIN)/pip install -q pyfaust
	$(BIN)/python benchmarks/projection.py
	$(BIN)/python benchmarks/ks_matmul_cpu.py
	$(BIN)/python benchmarks/quantize.py
	$(BIN)/python benchmarks/recovery.py

lint: $(STAMP)
	$(BIN)/ruff check lyoncompress tests benchmarks
	$(BIN)/ruff format --check lyoncompress tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format lyoncompress tests benchmarks
	$(BIN)/ruff check --fix lyoncompress tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
