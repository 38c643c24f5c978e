"""What every benchmark shares: the median timer, the copy-bandwidth ceiling, and the commit that ran."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import torch


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (triton's event-timed loop, warm-up included)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_gbps() -> float:
    """The memory ceiling: bytes read + written per second by a 1 GiB device-to-device copy, in GB/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6


def commit() -> str:
    """The checkout's commit. A device copy has no .git, so the caller passes DUO_QSERVE_COMMIT there."""
    if os.environ.get("DUO_QSERVE_COMMIT"):
        return os.environ["DUO_QSERVE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_header() -> tuple[str, str, float]:
    """(device name, date, copy bandwidth GB/s) for a result file; exits with a message when there is no GPU."""
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    device, copy = torch.cuda.get_device_name(), copy_bandwidth_gbps()
    print(f"{device}: device-to-device copy {copy:.0f} GB/s (read + write)", flush=True)
    return device, datetime.date.today().isoformat(), copy
