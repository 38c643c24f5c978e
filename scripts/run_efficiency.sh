#!/usr/bin/env bash
# Decode and pre-fill efficiency on a CUDA GPU (Llama-3-8B shape, synthetic weights): the attention kernels alone,
# then the whole model (fp16 full attention vs re-expanding the 4-bit cache vs W8A8KV4 + DuoAttention, eager and
# CUDA graphs; pre-fill per chunk). JSON + PNG under benchmarks/results/. Extra arguments go to the e2e benchmark.
# PATTERN: a Llama-3-8B DuoAttention pattern dir (default: the upstream Gradient-4194k one in ../shared).
set -euo pipefail
cd "$(dirname "$0")/.."
PATTERN="${PATTERN:-../shared/data/upstream_attn_patterns/Llama-3-8B-Instruct-Gradient-4194k}"
python -m duo_qserve.bench.attention --out benchmarks/results
python -m duo_qserve.bench.e2e --out benchmarks/results --pattern "$PATTERN" --no-capacity "$@"
