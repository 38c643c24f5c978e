#!/usr/bin/env bash
# Needle in a haystack for the default model: full attention (fp32) vs DuoAttention at 50% streaming heads with the
# trained, a random and the fast-scored pattern, and all-streaming (W8A8KV4 on a GPU, KV4 on a CPU), plus the trained
# pattern without W8A8. Sink 16 / recent 64 / chunk 256, so streaming heads really drop context during pre-fill.
# Results: benchmarks/results/niah-smollm2-<date>.json + one heat map per configuration. On a GPU the grid below takes
# about 4 minutes; on a CPU pass a smaller one (e.g. --lengths 1024 --depths 0,33,67,100 --trials 1).
# Extra arguments are passed through (e.g. --mode passkey --name passkey, --haystack-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
scored=test-output/niah/scored-pattern
[ -f "$scored/full_attention_heads.tsv" ] ||
  python -m duo_qserve.score_patterns --model default --out "$scored" --sink 16 --recent 64 --tokens 4096 \
    --samples 4 --device "$device"
python -m duo_qserve.eval.niah --device "$device" --name smollm2 --lengths 1024,2048,3072,4096 \
  --depths 0,25,50,75,100 --trials 2 --sink 16 --recent 64 --chunk-size 256 --sparsity 0.5 \
  --configs full,duo-trained,duo-random,duo-scored,streaming,duo-trained-kv4 --scored "$scored" "$@"
