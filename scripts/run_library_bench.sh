#!/usr/bin/env bash
# Book library benchmark on a CUDA machine: save and load a >= 1M-token Llama-3-8B cache next to the disk's speed.
#   scripts/run_library_bench.sh [--out DIR] [other duo_qserve.bench.library flags]
# PATTERN: a Llama-3-8B DuoAttention pattern dir (default: the upstream Gradient-4194k one in ../shared).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PATTERN="${PATTERN:-../shared/data/upstream_attn_patterns/Llama-3-8B-Instruct-Gradient-4194k}"
python3 -m duo_qserve.bench.library --pattern "$PATTERN" "$@"
