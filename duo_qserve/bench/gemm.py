"""W8A8 GEMM benchmark on Llama-3-8B linear shapes (needs a CUDA GPU).

Pre-fill: TOPS (2*M*N*K / time) of the Triton W8A8 GEMM, alone and with the fused activation quantization
that feeds it (rmsnorm_quantize for qkv/gate_up, quantize_per_token for o, silu_mul_quantize for down),
against cuBLAS bf16/fp16 ``torch.mm`` and ``torch._int_mm`` (raw int32 out, no scales).
Decode: effective weight bandwidth (weight bytes / time) at M=1 and 16 against bf16 ``torch.mm`` and the
device copy bandwidth measured in the same run. Weights rotate over enough copies that L2 never holds them.

    python -m duo_qserve.bench.gemm --out DIR    # writes DIR/gemm-<device>-<date>.json and .png
"""

from __future__ import annotations

import argparse
import itertools
from functools import partial
from pathlib import Path

import torch
import triton

from duo_qserve.bench.common import bench, bench_graph, gpu_header, write_result

from ..kernels import int8_gemm
from ..kernels.int8_gemm import w8a8_matmul
from ..kernels.quantize_act import quantize_per_token, rmsnorm_quantize, silu_mul_quantize

# name -> (N, K) for Llama-3-8B (hidden 4096, 32 q / 8 kv heads of 128, intermediate 14336).
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
PREFILL_M = (4096, 8192, 16384, 32768)
DECODE_M = (1, 16)
ROTATE_BYTES = 512 << 20  # > 10x the H100's 50 MB L2


def _act_quant(name: str, m: int, k: int):
    """The op that produces this linear's int8 input, as a closure over fp16 inputs of the right size."""
    if name == "down":
        gate, up = (
            torch.randn(m, k, dtype=torch.float16, device="cuda"),
            torch.randn(m, k, dtype=torch.float16, device="cuda"),
        )
        return lambda: silu_mul_quantize(gate, up)
    x = torch.randn(m, k, dtype=torch.float16, device="cuda")
    if name == "o":
        return lambda: quantize_per_token(x)
    w = torch.rand(k, device="cuda") + 0.5
    return lambda: rmsnorm_quantize(x, w, 1e-5)


def _row(op, m, n, k, method, ms, **rate) -> dict:
    """One result row, printed as it comes (a run cut short still shows what it measured)."""
    ((unit, value),) = rate.items()
    print(f"{op:8s} M={m:<6d} {method:24s} {ms:9.4f} ms {value:8.1f} {'TOPS' if unit == 'tops' else 'GB/s'}")
    return {"op": op, "M": m, "N": n, "K": k, "method": method, "ms": round(ms, 5), unit: value}


def _prefill_timings(name: str, m: int, n: int, k: int) -> dict[str, float]:
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    w_s = torch.rand(n, device="cuda") / 127
    quant = _act_quant(name, m, k)
    x_q, x_s = quant()
    timings = {
        "w8a8_triton": bench(lambda: w8a8_matmul(x_q, x_s, w_q, w_s, torch.float16)),
        "w8a8_triton+act_quant": bench(lambda: w8a8_matmul(*quant(), w_q, w_s, torch.float16)),
        "int_mm": bench(lambda: torch._int_mm(x_q, w_q.t())),
    }
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.randn(m, k, dtype=dtype, device="cuda")
        b = torch.randn(n, k, dtype=dtype, device="cuda")
        timings[f"{str(dtype).removeprefix('torch.')}_mm"] = bench(lambda a=a, b=b: torch.mm(a, b.t()))
    return timings


def prefill_rows(ms: tuple[int, ...]) -> list[dict]:
    rows = []
    for (name, (n, k)), m in itertools.product(SHAPES.items(), ms):
        for method, t in _prefill_timings(name, m, n, k).items():
            rows.append(_row(name, m, n, k, method, t, tops=round(2 * m * n * k / t / 1e9, 1)))
        torch.cuda.empty_cache()
    return rows


def _decode_timings(m: int, n: int, k: int) -> dict[str, tuple[float, int]]:
    """method -> (ms, weight bytes read), each timed as a CUDA graph of one call per weight copy (as the decode
    step runs: no launch overhead; the copies exceed L2)."""
    copies = max(2, ROTATE_BYTES // (n * k))
    ws = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda") for _ in range(copies)]
    w_s = torch.rand(n, device="cuda") / 127
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    x_s = torch.rand(m, 1, device="cuda")
    x_pad = torch.zeros(32, k, dtype=torch.int8, device="cuda")  # _int_mm needs M > 16
    timings = {
        "w8a8_triton": (
            bench_graph([partial(w8a8_matmul, x_q, x_s, w, w_s, torch.float16) for w in ws]),
            n * k,
        ),
        "int_mm_pad32": (bench_graph([partial(torch._int_mm, x_pad, w.t()) for w in ws]), n * k),
    }
    del ws
    wb = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(max(2, copies // 2))]
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    timings["bf16_mm"] = (bench_graph([partial(torch.mm, a, w.t()) for w in wb]), 2 * n * k)
    return timings


def decode_rows(ms: tuple[int, ...]) -> list[dict]:
    rows = []
    for (name, (n, k)), m in itertools.product(SHAPES.items(), ms):
        for method, (t, nbytes) in _decode_timings(m, n, k).items():
            rows.append(_row(name, m, n, k, method, t, GBps=round(nbytes / t / 1e6, 1)))
        torch.cuda.empty_cache()
    return rows


def decode_config_rows() -> list[dict]:
    """Every M=1 GEMV config launched alone (no autotuner) as a graph over rotating weights, plus its exactness
    against the float64 reference: shows how much the autotuner's pick matters."""
    rows = []
    for (name, (n, k)), cfg in itertools.product(SHAPES.items(), int8_gemm._GEMV_CONFIGS):
        ws = [
            torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
            for _ in range(max(2, ROTATE_BYTES // (n * k)))
        ]
        w_s, x_s = torch.rand(n, device="cuda") / 127, torch.rand(1, 1, device="cuda") / 127
        x_q = torch.randint(-127, 128, (1, k), dtype=torch.int8, device="cuda")
        out = torch.empty(1, n, dtype=torch.float32, device="cuda")
        c = cfg.kwargs

        def call(w, c=c, nw=cfg.num_warps, n=n, k=k, w_s=w_s, x_s=x_s, x_q=x_q, out=out):
            w4 = w.view(torch.int32)
            int8_gemm._w8a8_gemv_kernel[(triton.cdiv(n, c["BLOCK_N"]),)](
                x_q.view(torch.int32), x_s.reshape(-1), w4, w_s, out, w4, w_s, out, w4, w_s, out, out, n, 0, 0,
                k // 4, **c, ASM=True, HAS_RES=False, num_warps=nw,
            )  # fmt: skip

        call(ws[0])
        err = (out - int8_gemm.reference(x_q, x_s, ws[0], w_s, torch.float32)).abs().max().item()
        t = bench_graph([partial(call, w) for w in ws])
        method = f"gemv_cfg_{c['BLOCK_N']}x{c['BLOCK_K']}_w{cfg.num_warps}"
        rows.append(_row(name, 1, n, k, method, t, GBps=round(n * k / t / 1e6, 1)) | {"max_abs_err": err})
        del ws
    return rows


def tuned_configs() -> dict[str, str]:
    """The autotuner's choice per (M bucket, N, K): which tiles won, for the record."""
    out = {}
    kernels = (
        ("prefill", int8_gemm._prefill_gemm),
        ("decode", int8_gemm._decode_gemm),
        ("gemv", int8_gemm._gemv),
    )
    for regime, kernel in kernels:
        for key, cfg in kernel.cache.items():
            out[f"{regime}:{key[:3]}"] = str(cfg)
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, len(SHAPES) + 1, figsize=(5 * (len(SHAPES) + 1), 4))
    for ax, name in zip(axes, SHAPES, strict=False):
        rows = [r for r in result["rows"] if r["op"] == name and "tops" in r]
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["M"], r["tops"]) for r in rows if r["method"] == method]
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(
            xscale="log",
            xlabel="M (tokens)",
            ylabel="TOPS / TFLOP/s",
            title=f"pre-fill {name} {SHAPES[name]}",
        )
        ax.legend(fontsize=7)
    ax = axes[-1]
    rows = [r for r in result["rows"] if r["M"] == 1 and "GBps" in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        vals = [next(r["GBps"] for r in rows if r["op"] == s and r["method"] == method) for s in SHAPES]
        ax.bar(
            [j + i / (len(methods) + 1) for j in range(len(SHAPES))],
            vals,
            1 / (len(methods) + 1),
            label=method,
        )
    ax.axhline(result["copy_bandwidth_GBps"], color="k", ls="--", label="d2d copy")
    ax.set(xticks=range(len(SHAPES)), xticklabels=list(SHAPES), ylabel="GB/s of weight", title="decode M=1")
    ax.legend(fontsize=7)
    fig.suptitle(f"{result['device']} {result['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and PNG")
    p.add_argument("--prefill-m", type=int, nargs="+", default=list(PREFILL_M))
    p.add_argument("--decode-m", type=int, nargs="+", default=list(DECODE_M))
    args = p.parse_args(argv)
    device, date, copy = gpu_header()
    rows = decode_rows(tuple(args.decode_m)) + decode_config_rows() + prefill_rows(tuple(args.prefill_m))
    fields = {"tuned_configs": tuned_configs(), "rows": rows}
    path, result = write_result(args.out, "gemm", device, date, copy, argv, fields)
    plot(result, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
