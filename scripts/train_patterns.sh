#!/usr/bin/env bash
# Train the retrieval-head pattern of one named model with the recipe of its committed pattern: one run per L1 weight
# in REGS, one at a time, then the run whose pattern, served at 50% streaming heads, has the lowest distillation loss
# on held-out samples of the training task is installed in attn_patterns/<model> (config.json records every
# candidate's loss and every setting).
#   MODEL  default (SmolLM2-135M-Instruct: 400 steps at 1K-4K tokens, REGS 0.05 0.2 0.6), qwen2.5-coder-0.5b (150 steps
#          at 1K-6K, REGS 0.2) or qwen2.5-coder-1.5b (the reference recipe scaled to 32K and shortened to 150 steps:
#          1K-32K tokens, 10 passkeys of 32 words, training windows 128/256 served at 64/256, REGS 0.05 0.2)
#   REGS   the L1 weights to try
# The Qwen recipes need a GPU (bfloat16; at 32K a step holds ~30 GB with --recompute). On a CPU pass e.g. REGS=0.05
# and --steps 16 --context-min 256 --context-max 512. Extra arguments go to every run (e.g. --resume, --essays DIR;
# default: $DUO_QSERVE_ESSAYS, else ../shared/data/haystack/paul_graham_essays).
set -euo pipefail
cd "$(dirname "$0")/.."
export DUO_QSERVE_ESSAYS=${DUO_QSERVE_ESSAYS:-../shared/data/haystack/paul_graham_essays}
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
model=${MODEL:-default}
case "$model" in
  default | smollm2-135m)
    out=SmolLM2-135M-Instruct regs=${REGS:-0.05 0.2 0.6}
    recipe=(--steps 400 --context-min 1000 --context-max 4000 --passkeys 4 --passkey-length 5 --sink 16 --recent 64) ;;
  qwen2.5-coder-0.5b)
    out=Qwen2.5-Coder-0.5B-Instruct regs=${REGS:-0.2}
    recipe=(--dtype bfloat16 --steps 150 --context-min 1000 --context-max 6000 --passkeys 4 --passkey-length 5
            --sink 64 --recent 256) ;;
  qwen2.5-coder-1.5b)
    out=Qwen2.5-Coder-1.5B-Instruct regs=${REGS:-0.05 0.2}
    recipe=(--dtype bfloat16 --steps 150 --context-min 1000 --context-max 32000 --passkeys 10 --passkey-length 32
            --sink 128 --recent 256 --recompute) ;;
  *) echo "MODEL: one of default, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b" >&2; exit 2 ;;
esac
runs=test-output/patterns/$out
mkdir -p "$runs"
dirs=()
for reg in $regs; do
  dir="$runs/reg=$reg"
  dirs+=("$dir")
  python -m duo_qserve.train_patterns --model "$model" --out "$dir" --device "$device" "${recipe[@]}" \
    --deploy-sink 64 --deploy-recent 256 --checkpoint-every 25 --reg-weight "$reg" "$@" > "$dir.log" 2>&1 ||
    { echo "training $dir failed:"; tail -20 "$dir.log"; exit 1; }
  tail -n 2 "$dir.log"
done
python -m duo_qserve.train_patterns --out "attn_patterns/$out" --select-from "${dirs[@]}"
