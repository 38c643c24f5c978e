#!/usr/bin/env bash
# Train the retrieval-head pattern of the default model (SmolLM2-135M-Instruct) on this machine's CPU.
# Sized for a ~35-minute CPU budget on 2 shared cores (80-160 s/step at these lengths while the cores are shared); on a GPU pass
# --device cuda and raise --steps / --context-max. Extra arguments are passed through (e.g. --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m duo_qserve.train_patterns --model default --out attn_patterns/SmolLM2-135M-Instruct \
  --steps 16 --context-min 256 --context-max 512 --passkeys 2 --passkey-length 5 \
  --sink 16 --recent 64 --checkpoint-every 2 "$@"
