#!/usr/bin/env bash
# The test command: sets up .venv (CPU is enough), then lint + the whole test suite.
# GPU kernels run through Triton's interpreter here (TRITON_INTERPRET=1 inside their tests) and for real on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="app,dev" . scripts/setup_env.sh
if [ -x /usr/bin/chromium ]; then :; elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser test will be skipped"
fi
ruff check .
ruff format --check .
python -m pytest -q "$@"
