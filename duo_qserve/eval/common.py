"""What every evaluation result file starts with (where, when, from which commit, by which command), and how it is
written (atomically, so a reader or a crash never sees half a file)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from duo_qserve.environment import commit


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def result_header(module: str, argv: list[str] | None, device: str) -> dict:
    """device, date, commit, the command as typed (``python -m module ...``), Python and torch versions."""
    args = sys.argv[1:] if argv is None else argv
    return dict(
        device=device_name(device), date=datetime.date.today().isoformat(), commit=commit(),
        command=shlex.join(["python", "-m", module, *args]), python=platform.python_version(),
        torch=torch.__version__,
    )  # fmt: skip


def _finite(x):
    """JSON has no NaN: empty cells (a run cut short) become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: Path, data: dict) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (atomic on one file system)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path
