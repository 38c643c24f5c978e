#!/usr/bin/env bash
# Set up what is missing (once) and start the app; fast when everything is already there.
#   bash scripts/run_demo.sh [--port 7860] [--host 127.0.0.1] [--model default|DIR|FILE.gguf] [--pattern DIR|auto|none]
#                            [--sparsity 0.5] [--kv-bits 4] [--max-tokens N] [--cpu] [--share] [--auth USER:PASS]
# Every flag goes to `python -m app.main` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

EXTRAS=app . scripts/setup_env.sh  # .venv, dependencies, the default model (each only when missing)

host=127.0.0.1 port=7860
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --host) host=${args[i + 1]:-} ;;
    --host=*) host=${args[i]#--host=} ;;
    --port) port=${args[i + 1]:-} ;;
    --port=*) port=${args[i]#--port=} ;;
  esac
done

echo "starting the app: open http://$host:$port (Ctrl-C stops it)"
exec python -m app.main "$@"
