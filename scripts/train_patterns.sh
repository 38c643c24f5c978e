#!/usr/bin/env bash
# Train the retrieval-head pattern of the default model (SmolLM2-135M-Instruct): the settings of the committed
# pattern, 400 steps, which took 153 s on an H100. Runs on the GPU when there is one; on a CPU a step of these
# lengths takes minutes, so pass e.g. --steps 16 --context-min 256 --context-max 512 there. Extra arguments are
# passed through (e.g. --resume, --model DIR, --haystack-dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
python -m duo_qserve.train_patterns --model default --out attn_patterns/SmolLM2-135M-Instruct --device "$device" \
  --steps 400 --context-min 1000 --context-max 4000 --passkeys 4 --passkey-length 5 \
  --sink 16 --recent 64 --checkpoint-every 25 "$@"
