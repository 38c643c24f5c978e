#!/usr/bin/env bash
# Capacity on this CUDA GPU: the longest context of the Llama-3-8B shape (synthetic weights, W8A8KV4, 50% streaming
# heads of the upstream Gradient-4194k pattern) whose cache fits beside the weights and a measured pre-fill chunk,
# checked by pre-filling a real chunk into it and decoding at that length. JSON under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PATTERN="${PATTERN:-../shared/data/upstream_attn_patterns/Llama-3-8B-Instruct-Gradient-4194k}"
python -m duo_qserve.bench.e2e --out benchmarks/results --pattern "$PATTERN" \
  --methods duo-w8a8kv4-graph --contexts 1048576 --prefill-tokens 65536 --prefill-seconds 20 "$@"
