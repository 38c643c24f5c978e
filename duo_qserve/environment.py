"""Every ``DUO_QSERVE_*`` environment variable, read here and nowhere else.

Each is read when asked for, not at import, so a test or a caller that sets one before a call is obeyed.

| variable | meaning | unset |
| --- | --- | --- |
| ``DUO_QSERVE_MODELS`` | the local model store | ``<repo>/models`` |
| ``DUO_QSERVE_LIBRARY`` | the library of saved documents | ``<repo>/library`` |
| ``DUO_QSERVE_ESSAYS`` | the essays directory (``duo_qserve.data``) | none: a tool that needs essays says so |
| ``DUO_QSERVE_TRITON`` | ``1``: the Triton kernels also for CPU tensors (interpreted) | the reference on CPU |
| ``DUO_QSERVE_DECODE_GRAPH`` | ``0``: decode eagerly on CUDA | CUDA-graph replay |
| ``DUO_QSERVE_COMMIT`` | the commit result files name (a device copy has no ``.git``) | ``git rev-parse HEAD`` |
| ``DUO_QSERVE_ADMIN_TOKEN`` | the app's ``--admin-token`` (who may change the model and its settings) | nobody may |
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ESSAYS = "DUO_QSERVE_ESSAYS"


def models_dir() -> Path:
    return Path(os.environ.get("DUO_QSERVE_MODELS") or REPO_ROOT / "models")


def library_dir() -> Path:
    return Path(os.environ.get("DUO_QSERVE_LIBRARY") or REPO_ROOT / "library")


def essays_dir() -> str | None:
    return os.environ.get(ESSAYS) or None


def triton_on_cpu() -> bool:
    return os.environ.get("DUO_QSERVE_TRITON") == "1"


def decode_graph() -> bool:
    return os.environ.get("DUO_QSERVE_DECODE_GRAPH", "1") != "0"


def admin_token() -> str | None:
    return os.environ.get("DUO_QSERVE_ADMIN_TOKEN") or None


def commit() -> str:
    """``$DUO_QSERVE_COMMIT``, else the checkout's HEAD, else "unknown"."""
    if os.environ.get("DUO_QSERVE_COMMIT"):
        return os.environ["DUO_QSERVE_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
