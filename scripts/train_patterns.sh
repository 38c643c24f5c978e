#!/usr/bin/env bash
# Train the retrieval-head pattern of the default model (SmolLM2-135M-Instruct) with the settings of the committed
# pattern: one run per L1 weight in REGS (400 steps each, about 160 s on an H100; one at a time, as a run at these
# lengths holds ~38 GB of GPU memory), then the run whose pattern, served at 50% streaming heads, has the lowest
# distillation loss on held-out samples of the training task is installed in attn_patterns/SmolLM2-135M-Instruct
# (config.json records every candidate's loss). On a CPU a step of these lengths takes minutes, so pass e.g.
# REGS=0.05 and --steps 16 --context-min 256 --context-max 512. Extra arguments go to every run (e.g. --resume,
# --essays DIR; default: $DUO_QSERVE_ESSAYS, else ../shared/data/haystack/paul_graham_essays).
set -euo pipefail
cd "$(dirname "$0")/.."
export DUO_QSERVE_ESSAYS=${DUO_QSERVE_ESSAYS:-../shared/data/haystack/paul_graham_essays}
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
runs=test-output/patterns
mkdir -p "$runs"
dirs=()
for reg in ${REGS:-0.05 0.2 0.6}; do
  dir="$runs/reg=$reg"
  dirs+=("$dir")
  python -m duo_qserve.train_patterns --model default --out "$dir" --device "$device" \
    --steps 400 --context-min 1000 --context-max 4000 --passkeys 4 --passkey-length 5 \
    --sink 16 --recent 64 --checkpoint-every 25 --reg-weight "$reg" "$@" > "$dir.log" 2>&1 ||
    { echo "training $dir failed:"; tail -20 "$dir.log"; exit 1; }
  tail -n 2 "$dir.log"
done
python -m duo_qserve.train_patterns --out attn_patterns/SmolLM2-135M-Instruct --select-from "${dirs[@]}"
