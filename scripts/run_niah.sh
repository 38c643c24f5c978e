#!/usr/bin/env bash
# Needle in a haystack for the default model: full attention (fp32) vs DuoAttention at 50% streaming heads with the
# trained, a random and the fast-scored pattern, all-streaming and all-retrieval (W8A8KV4 on a GPU, KV4 on a CPU),
# plus the trained pattern without W8A8. Sink 16 / recent 64 / chunk 256, so streaming heads really drop context
# during pre-fill. Results: $OUT_DIR/niah-smollm2-<date>.json (default benchmarks/results) + one heat map per
# configuration. On a GPU the configurations run as 4 concurrent processes; on a CPU one after another, so pass a
# smaller grid there (e.g. --lengths 1024 --depths 0,33,67,100 --trials 1). HAYSTACK_DIR overrides the essays'
# directory. Extra arguments go to every NIAH run (e.g. --mode passkey --name passkey).
set -euo pipefail
cd "$(dirname "$0")/.."
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
out_dir=${OUT_DIR:-benchmarks/results}
hay=(${HAYSTACK_DIR:+--haystack-dir "$HAYSTACK_DIR"})
scored=test-output/niah/scored-pattern
mkdir -p test-output
python -m duo_qserve.score_patterns --model default --out "$scored" --sink 16 --recent 64 --tokens 4000 \
  --samples 8 --device "$device" "${hay[@]}"
rm -f "$out_dir/niah-smollm2-$(date +%F).json"  # the runs below append to one fresh file
run() {
  python -m duo_qserve.eval.niah --device "$device" --name smollm2 --lengths 1024,2048,3072,4096 \
    --depths 0,25,50,75,100 --trials 4 --sink 16 --recent 64 --chunk-size 256 --sparsity 0.5 \
    --scored "$scored" --out-dir "$out_dir" --append "${hay[@]}" --configs "$@"
}
groups=(full,streaming duo-trained,duo-random full-quantized,duo-scored duo-trained-kv4)
if [ "$device" = cuda ]; then
  pids=()
  for g in "${groups[@]}"; do
    run "$g" "$@" > "test-output/niah-$g.log" 2>&1 &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "NIAH ${groups[$i]} failed:"; tail -20 "test-output/niah-${groups[$i]}.log"; exit 1; }
    tail -n 2 "test-output/niah-${groups[$i]}.log"
  done
else
  for g in "${groups[@]}"; do run "$g" "$@"; done
fi
