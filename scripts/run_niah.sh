#!/usr/bin/env bash
# Needle in a haystack for the default model on the CPU: full attention vs DuoAttention (50% streaming heads, KV4)
# with the trained, a random and the fast-scored pattern, and all-streaming. Sink 16 / recent 64 / chunk 256, so
# streaming heads really drop context during pre-fill. Results: benchmarks/results/niah-smollm2-<date>.json + PNGs.
# The grid is sized for a ~30-minute budget on 2 shared CPU cores. Extra arguments are passed through (e.g. --configs full,duo-trained --append, or --mode passkey --name passkey).
set -euo pipefail
cd "$(dirname "$0")/.."
scored=test-output/niah/scored-pattern
[ -f "$scored/full_attention_heads.tsv" ] ||
  python -m duo_qserve.score_patterns --model default --out "$scored" --sink 16 --recent 64 --tokens 1024 --samples 2
python -m duo_qserve.eval.niah --name smollm2 --lengths 1024 --depths 0,33,67,100 \
  --sink 16 --recent 64 --chunk-size 256 --sparsity 0.5 --scored "$scored" "$@"
