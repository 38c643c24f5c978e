"""What every benchmark shares: the median timer, the copy-bandwidth ceiling, the commit that ran, and the result
file with its common header."""

from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path

import torch

from duo_qserve import environment


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (triton's event-timed loop, warm-up included)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(calls: list, reps: int = 20) -> float:
    """Median milliseconds per call of ``calls`` replayed back to back in one CUDA graph: no launch or Python
    overhead, as in the graph-captured decode step. Give calls different buffers so that L2 holds none of them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, autotunes) outside the capture
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / len(calls))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbps() -> float:
    """The memory ceiling: bytes read + written per second by a 1 GiB device-to-device copy, in GB/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench(lambda: dst.copy_(src)) / 1e6


def gpu_header() -> tuple[str, str, float]:
    """(device name, date, copy bandwidth GB/s) for a result file; exits with a message when there is no GPU."""
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    device, copy = torch.cuda.get_device_name(), copy_bandwidth_gbps()
    print(f"{device}: device-to-device copy {copy:.0f} GB/s (read + write)", flush=True)
    return device, datetime.date.today().isoformat(), copy


def write_result(out_dir: str | Path, kind: str, device: str, date: str, copy: float, argv: list[str] | None,
                 fields: dict, module: str | None = None) -> tuple[Path, dict]:  # fmt: skip
    """``<out_dir>/<kind>-<device>-<date>.json``: device, date, commit, command (``duo_qserve.bench.<module>``,
    by default the kind), library versions and the copy ceiling, then the benchmark's own ``fields``. Returns the
    path (a plot goes beside it) and the result."""
    import triton

    command = " ".join(
        [f"python -m duo_qserve.bench.{module or kind}", *(sys.argv[1:] if argv is None else argv)]
    )
    result = {
        "device": device, "date": date, "commit": environment.commit(), "command": command,
        "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": round(copy, 1), **fields,
    }  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}-{date}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return path, result
