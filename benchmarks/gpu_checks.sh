#!/usr/bin/env bash
# Every GPU-only check in one go, for a lent GPU machine whose image has torch and CuPy:
# the kernel tests against the torch reference, then the kernel benchmark.
# Usage: OUT=folder benchmarks/gpu_checks.sh   (logs land in $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lyoncompress-gpu}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__, torch.cuda.get_device_name())"
# kernel compilation is CPU-bound: spread the tests over processes where pytest-xdist is there
PARALLEL=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -m gpu $PARALLEL tests/test_kernels.py --tb=short -p no:cacheprovider \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -n 40
# factorize --device cuda: capture, fits, allocation, sequential, distillation, resume
timeout "${DEVICE_TIMEOUT:-240}" python3 -m pytest -q -m cuda tests/test_device.py --tb=short -p no:cacheprovider \
  2>&1 | tee "$OUT/device_tests.log" | tail -n 40
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/ks_matmul_gpu.py 2>&1 | tee "$OUT/ks_matmul_gpu.log"
