"""Where the time of one CUDA-graph decode step goes (a named model shape, synthetic weights; needs a CUDA GPU).

The step of ``duo_qserve.decode_graph`` is replayed under the PyTorch profiler, which records every kernel of
the graph with its start and end. Per context the result lists, for each kernel (name and grid: the GEMVs of
different shapes are told apart by their grids), how many run per step and their microseconds per step, and the
step's idle time between kernels (launch gaps), against the step's floor (weight + KV bytes / copy bandwidth).

    python -m duo_qserve.bench.decode_profile --out DIR --pattern DIR [--contexts 32768,1048576]
        [--shape qwen2.5-coder-1.5b] [--recipe FILE]

``--recipe``: a W8A8 recipe file (``duo_qserve.quant.recipe``, e.g. the one shipped in ``quant/calibration/``):
a rotation recipe adds its online Hadamard to the step, as in the served model. Without it, plain W8A8.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

from duo_qserve.bench.common import gpu_header, write_result
from duo_qserve.bench.e2e import fill_synthetic, kv_bytes_read, model_parser, weight_bytes_read
from duo_qserve.cache import CacheConfig, CacheSpec, DuoKVCache
from duo_qserve.decode_graph import GraphedDecoder
from duo_qserve.loading import load_model
from duo_qserve.patterns import load_pattern, reorder_heads
from duo_qserve.quant.recipe import quantize_with_recipe
from duo_qserve.quant.w8a8 import quantize_model_w8a8


def kernel_trace(fn, steps: int) -> list[dict]:
    """The kernels ``fn`` runs, ``steps`` times, from the profiler's trace: name, grid, start and duration (us)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    kernels.sort(key=lambda e: e["ts"])
    return [
        {"name": e["name"], "grid": tuple(e.get("args", {}).get("grid", ())), "ts": e["ts"], "dur": e["dur"]}
        for e in kernels
    ]


def summarize(kernels: list[dict], steps: int) -> dict:
    """Per-step totals: kernel time, idle time between consecutive kernels, and the kernels grouped by
    (name, grid), largest first."""
    busy = sum(k["dur"] for k in kernels)
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    groups: dict[tuple, list[float]] = defaultdict(list)
    for k in kernels:
        groups[(k["name"], k["grid"])].append(k["dur"])
    table = [
        {"kernel": name[:90], "grid": list(grid), "per_step": len(d) / steps, "us_per_step": sum(d) / steps}
        for (name, grid), d in groups.items()
    ]
    table.sort(key=lambda r: -r["us_per_step"])
    return {
        "kernels_per_step": len(kernels) / steps,
        "kernel_us_per_step": busy / steps,
        # between replays the host idles too; those gaps are counted once per step, in the step's span
        "idle_us_per_step": (span - busy) / steps,
        "by_kernel": table,
    }


def run(args) -> dict:
    device, date, copy = gpu_header()
    bw = copy * 1e9
    pattern = load_pattern(args.pattern)
    mask, sparsity = pattern.retrieval_mask(args.sparsity)
    config = CacheConfig(kv_bits=4, sink_tokens=pattern.sink_size, recent_tokens=pattern.recent_size)
    model = load_model(f"synthetic:{args.shape}", "cuda", torch.float16).model
    heads = reorder_heads(model, mask)
    if args.recipe:
        quantize_with_recipe(model, args.recipe)
    else:
        quantize_model_w8a8(model)
    torch.cuda.empty_cache()
    w_q = weight_bytes_read(model)
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        spec = CacheSpec(model.args, heads, config, ctx + 256, torch.float16)
        cache = DuoKVCache(spec, "cuda")
        fill_synthetic(cache, ctx)
        decoder = GraphedDecoder(model, cache)

        def step(cache=cache, decoder=decoder, ctx=ctx):
            cache.set_length(ctx)  # rolled back: every step decodes at ``ctx`` tokens
            decoder.step(1)

        for _ in range(3):  # capture, then replays
            step()
        times = []
        for _ in range(args.steps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            step()
            e1.record()
            torch.cuda.synchronize()
            times.append(e0.elapsed_time(e1))
        kernels = kernel_trace(step, args.steps)
        row = {
            "context": ctx,
            "ms_per_token": sorted(times)[len(times) // 2],
            "floor_ms": (w_q + kv_bytes_read(spec, ctx)) / bw * 1000,
            **summarize(kernels, args.steps),
        }
        rows.append(row)
        print(
            f"{ctx:>9} tokens: {row['ms_per_token']:.3f} ms (floor {row['floor_ms']:.3f}), "
            f"{row['kernels_per_step']:.0f} kernels, {row['kernel_us_per_step']:.0f} us busy, "
            f"{row['idle_us_per_step']:.0f} us idle",
            flush=True,
        )
        for r in row["by_kernel"][:16]:
            print(f"   {r['us_per_step']:9.1f} us  x{r['per_step']:<4.0f} {r['grid']} {r['kernel'][:70]}")
        del decoder, cache
        torch.cuda.empty_cache()
    return write_result(
        args.out, "decode-profile", device, date, copy, None,
        {"model_shape": f"{args.shape} (synthetic weights)", "recipe": args.recipe, "pattern": pattern.name,
         "sparsity": sparsity, "weights_read_bytes": w_q, "rows": rows}, module="decode_profile",
    )[1]  # fmt: skip


def main(argv=None) -> int:
    p = model_parser(__doc__, "32768,1048576")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--shape", default="llama-3-8b", help="a model shape of duo_qserve.model.PRESETS")
    p.add_argument("--recipe", default=None, help="a W8A8 recipe file (default: plain W8A8)")
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
