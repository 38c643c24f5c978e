#!/usr/bin/env bash
# W8A8 GEMM benchmark on a CUDA machine: checks the kernels on the GPU first, then benchmarks.
#   scripts/run_gemm_bench.sh [--out DIR] [other duo_qserve.bench.gemm flags]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -m pytest -q -p no:cacheprovider tests/test_int8_kernels.py
python3 -m duo_qserve.bench.gemm "$@"
