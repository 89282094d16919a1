#!/bin/sh
# The GPU check (benchmarks/gpu_check.py) with its log: run from the repository root on a
# machine with a CUDA device; writes benchmarks/gpu_check.json and benchmarks/gpu_check.log.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 420 "$PY" benchmarks/gpu_check.py \
    --out benchmarks/gpu_check.json "$@" 2>&1 | tee benchmarks/gpu_check.log
