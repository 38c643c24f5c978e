#!/usr/bin/env bash
# Needle in a haystack (duo_qserve/eval/niah.py) for one model: every configuration (full16, w8a8-kv16, kv4,
# w8a8kv4, duo50, duo75, duo50-w8a8, duo75-w8a8, random50) on the same documents (numbers, words and two-fact
# documents in the essays and in the Python documentation, 5 depths), in one process that builds each
# configuration's engine once. Results: benchmarks/results/niah-<model>-<date>.json + one heat map per configuration,
# and a markdown table printed at the end.
#   MODEL    a named model (default: default = SmolLM2-135M-Instruct; qwen2.5-coder-0.5b, qwen2.5-coder-1.5b)
#   LENGTHS  context lengths (default: 2048,4096,7680 for SmolLM2's 8K context, 4096-32768 for the 32K Qwen models)
#   DUO_QSERVE_ESSAYS  the essays directory (default: ../shared/data/haystack/paul_graham_essays)
# Extra arguments go to the harness, e.g. --trials 2 --deadline 540 (seconds; stops cleanly, results written), or
# on a CPU a smaller grid: --configs full16,duo50,random50 --depths 10,50,90.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${MODEL:-default}
case "$model" in
  default | smollm2-135m) lengths=${LENGTHS:-2048,4096,7680} ;;
  *) lengths=${LENGTHS:-4096,8192,16384,24576,32768} ;;
esac
export DUO_QSERVE_ESSAYS=${DUO_QSERVE_ESSAYS:-../shared/data/haystack/paul_graham_essays}
python -m duo_qserve.eval.niah --model "$model" --lengths "$lengths" --depths 10,30,50,70,90 "$@"
