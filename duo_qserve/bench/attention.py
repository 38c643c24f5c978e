"""Attention over the quantized KV prefix: kernel-level benchmark (needs a CUDA GPU).

One layer of Llama-3-8B at 50 % retrieval heads (4 kv heads x 4 query heads, head_dim 128, 4-bit, key group 128);
whole-model figures are 32 x the layer.

- check: the Triton paths against the fp32 reference on random non-zero data (decode, pre-fill, quantize-on-write;
  4- and 8-bit), errors recorded in the JSON.
- decode (T=1): the split-K code kernel's time, bytes read (codes + scales/zeros) and GB/s against the copy
  bandwidth measured in the same run; the "re-expand" baseline (de-quantize the whole prefix to fp16 every step,
  as the DuoAttention demo does, then SDPA; both a plain-PyTorch and a fused Triton de-quantization, the faster
  one is the baseline) and fp16 SDPA over an fp16 cache of the same length. Inputs rotate over enough copies
  that L2 never holds them, all replayed in a CUDA graph (as the decode step runs) so no host launch cost counts.
- pre-fill: an 8K-query chunk over a 256K quantized prefix: TFLOP/s of the slab path and of the fused code kernel
  against fp16 SDPA (cuDNN and flash) on the same shapes.

    python -m duo_qserve.bench.attention --out DIR    # writes DIR/attention-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from duo_qserve.bench.common import bench, bench_graph, gpu_header, write_result

from ..kernels import attention
from ..kernels import kv_attention as ka
from ..kernels.kv_quantize import quantize_kv
from ..kernels.kv_quantize import reference as quantize_reference
from ..quant.kv_quant import dequantize_keys, dequantize_values

HKV, G, D, GROUP, LAYERS = 4, 4, 128, 128, 32
CONTEXTS = (32 << 10, 256 << 10, 1 << 20, 2 << 20)
PREFILL_T, PREFILL_N = 8192, 256 << 10
ROTATE_BYTES = 512 << 20  # > 10x the H100's 50 MB L2
# (block_n, warps, stages, waves): programs of 2 warps x 128 tokens, 4 per SM (registers and shared memory allow 4
# with 3 stages, 5 with 2), or of 1 warp x 64 tokens, up to 12 per SM
DECODE_CONFIGS = [(128, 2, 3, 4.0), (128, 2, 2, 5.0), (64, 1, 3, 8.0), (64, 1, 3, 12.0), (64, 1, 2, 12.0)]
LONG_CHECK = 1 << 20  # tokens of the long-context accuracy check


def random_cache(n: int, bits: int = 4, hkv: int = HKV, d: int = D, group: int = GROUP) -> ka.QuantArena:
    """An arena of n tokens: random non-zero codes and plausible scales/zeros (timing only: any codes are as
    costly)."""
    dev = "cuda"
    nb = d * bits // 8
    return ka.QuantArena(
        torch.randint(0, 256, (hkv, n, nb), dtype=torch.uint8, device=dev),
        (torch.rand(hkv, n // group, d, device=dev) * 0.2 + 0.01).half(),
        (torch.randn(hkv, n // group, d, device=dev) - 1).half(),
        torch.randint(0, 256, (hkv, n, nb), dtype=torch.uint8, device=dev),
        (torch.rand(hkv, n, device=dev) * 0.2 + 0.01).half(),
        (torch.randn(hkv, n, device=dev) - 1).half(),
        n, bits, group,
    )  # fmt: skip


def cache_bytes(cache: ka.QuantArena) -> int:
    return sum(t.numel() * t.element_size() for t in cache.tensors)


def rotating(make, nbytes: int) -> list:
    """Enough copies of ``make()`` to exceed ROTATE_BYTES, so that timing them in turn never hits L2."""
    return [make() for _ in range(max(1, -(-ROTATE_BYTES // nbytes)))]


def bench_rotating(fn, copies: list) -> float:
    """Milliseconds per ``fn(copy)``, the copies taken in turn in one CUDA graph, as the decode step runs: a
    kernel of tens of microseconds is otherwise timed behind its host launch cost."""
    return bench_graph([lambda c=c: fn(c) for c in copies])


def _err(out, lse, ref_out, ref_lse) -> dict:
    return {
        "out_rel_max_err": ((out.float() - ref_out).abs().max() / ref_out.abs().max()).item(),
        "lse_max_abs_err": (lse - ref_lse).abs().max().item(),
    }


def check_rows() -> list[dict]:
    """Triton vs the fp32 reference on quantized random data (codes from quantize_kv, checked bit-exact)."""
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for t, n_ctx, kernel in ((1000, 300, "cudnn"), (1000, 300, "flash"), (1, 300, "auto"), (300, 0, "auto")):
        q = torch.randn(t, HKV * G, D, device="cuda", generator=gen).half()
        k = torch.randn(HKV, n_ctx + t, D, device="cuda", generator=gen).half()
        v = torch.randn(HKV, n_ctx + t, D, device="cuda", generator=gen).half()
        out, lse = attention.dense_attention(q, k, v, n_ctx, D**-0.5, kernel=kernel)
        ref_out, ref_lse = attention.reference(q.float(), k.float(), v.float(), n_ctx, D**-0.5)
        rows.append(
            {
                "kind": "check",
                "op": f"dense-{kernel}",
                "t": t,
                "n_ctx": n_ctx,
                **_err(out, lse, ref_out, ref_lse),
            }
        )
    cases = [(4, 4, 128, 128), (8, 4, 128, 128), (4, 3, 64, 64), (4, 4, 128, 32)]
    for bits, g, d, group in cases:
        n = group * 70
        k = torch.randn(HKV, n, d, device="cuda", generator=gen) * 2 + 0.5
        v = torch.randn(HKV, n, d, device="cuda", generator=gen)
        codes = quantize_kv(k.half(), v.half(), bits, group)
        ref = quantize_reference(k.half(), v.half(), bits, group)
        codes_diff = max((a.int() - b.int()).abs().max().item() for a, b in zip(codes, ref, strict=True))
        cache = ka.QuantArena(*codes, n, bits, group)
        rows.append({"kind": "check", "op": "quantize_kv", "bits": bits, "group": group, "d": d,
                     "max_abs_diff": codes_diff})  # fmt: skip
        for t in (1, 4, 16, 100, 1000):
            for dtype in (torch.float16, torch.bfloat16):
                q = torch.randn(t, HKV * g, d, device="cuda", generator=gen).to(dtype)
                ref_out, ref_lse = ka.reference(q.float(), cache, d**-0.5)
                out, lse = ka.quantized_prefix_attention(q, cache, d**-0.5)
                path = "decode" if t <= ka.DECODE_MAX_T else "prefill-slab"
                rows.append({"kind": "check", "op": path, "bits": bits, "g": g, "d": d, "group": group, "t": t,
                             "dtype": str(dtype), **_err(out, lse, ref_out, ref_lse)})  # fmt: skip
                if t in (1, 16) and dtype == torch.float16:
                    out, lse = ka.decode_attention(q, cache, d**-0.5, num_splits=1)
                    rows.append({"kind": "check", "op": "decode-1split", "bits": bits, "g": g, "d": d,
                                 "group": group, "t": t, **_err(out, lse, ref_out, ref_lse)})  # fmt: skip
                    out, lse = ka.decode_attention(q, cache, d**-0.5, waves=16, block_n=32)
                    rows.append({"kind": "check", "op": "decode-many-splits", "bits": bits, "g": g, "d": d,
                                 "group": group, "t": t, **_err(out, lse, ref_out, ref_lse)})  # fmt: skip
                if t in (100, 1000) and dtype == torch.float16:
                    out, lse = ka.decode_attention(q, cache, d**-0.5, block_m=128, num_warps=8)
                    rows.append({"kind": "check", "op": "prefill-fused", "bits": bits, "g": g, "d": d,
                                 "group": group, "t": t, **_err(out, lse, ref_out, ref_lse)})  # fmt: skip
                    out, lse = ka.prefill_attention(q, cache, d**-0.5, slab_bytes=1 << 20)
                    rows.append({"kind": "check", "op": "prefill-slab-small", "bits": bits, "g": g, "d": d,
                                 "group": group, "t": t, **_err(out, lse, ref_out, ref_lse)})  # fmt: skip
    return rows + long_check_rows(gen)


def long_check_rows(gen: torch.Generator, n: int = LONG_CHECK) -> list[dict]:
    """Decode over ``n`` quantized tokens against the fp32 reference, with the default splits and with one split
    (one program runs the online softmax over every token: rounding that accumulates would show here). Random
    queries spread the attention over all tokens, which is what makes their sum long."""
    k = torch.randn(HKV, n, D, device="cuda", generator=gen, dtype=torch.float16) * 2 + 0.5
    v = torch.randn(HKV, n, D, device="cuda", generator=gen, dtype=torch.float16)
    cache = ka.QuantArena(*quantize_kv(k, v, 4, GROUP), n, 4, GROUP)
    del k, v
    q = torch.randn(1, HKV * G, D, device="cuda", generator=gen).half()
    ref_out, ref_lse = ka.reference(q.float(), cache, D**-0.5)
    rows = []
    for splits in (None, 1):
        out, lse = ka.decode_attention(q, cache, D**-0.5, num_splits=splits)
        rows.append({"kind": "check", "op": "decode-long", "n_ctx": n, "splits": splits or "default",
                     **_err(out, lse, ref_out, ref_lse)})  # fmt: skip
    return rows


def _decode_row(variant: str, n: int, ms: float, nbytes: int, copy: float, **extra) -> dict:
    gbps = nbytes / ms / 1e6
    return {"kind": "decode", "variant": variant, "context": n, "ms": round(ms, 4), "bytes": nbytes,
            "GBps": round(gbps, 1), "pct_copy": round(100 * gbps / copy, 1),
            "model_ms": round(LAYERS * ms, 3), **extra}  # fmt: skip


def decode_sweep(n: int, copy: float) -> tuple[list[dict], dict]:
    """Kernel configurations (``DECODE_CONFIGS``) at context n; returns the rows and the fastest config's
    kwargs."""
    q = torch.randn(1, HKV * G, D, device="cuda", dtype=torch.float16)
    nbytes = cache_bytes(random_cache(GROUP)) // GROUP * n
    caches = rotating(lambda: random_cache(n), nbytes)
    rows, best = [], (float("inf"), {})
    for bn, warps, stages, waves in DECODE_CONFIGS:
        kw = {"block_n": bn, "num_warps": warps, "num_stages": stages, "waves": waves}
        try:
            ms = bench_rotating(lambda c, kw=kw: ka.decode_attention(q, c, D**-0.5, **kw), caches)
        except Exception as e:  # a config that does not compile (registers/shared memory) is reported
            rows.append({"kind": "decode-config", "context": n, **kw, "error": repr(e)[:200]})
            continue
        rows.append(_decode_row("config", n, ms, nbytes, copy, **kw) | {"kind": "decode-config"})
        best = min(best, (ms, kw), key=lambda x: x[0])
    return rows, best[1]


def decode_rows(contexts: tuple[int, ...], copy: float, cfg: dict) -> list[dict]:
    rows = []
    for n in contexts:
        rows += _decode_context(n, copy, cfg)
        torch.cuda.empty_cache()
    return rows


def _decode_context(n: int, copy: float, cfg: dict) -> list[dict]:
    q = torch.randn(1, HKV * G, D, device="cuda", dtype=torch.float16)
    nbytes = cache_bytes(random_cache(GROUP)) // GROUP * n
    caches = rotating(lambda: random_cache(n), nbytes)
    ms = bench_rotating(lambda c: ka.decode_attention(q, c, D**-0.5, **cfg), caches)
    rows = [_decode_row("triton-codes", n, ms, nbytes, copy, **cfg)]

    # Re-expand: fp16 K/V of the whole prefix rebuilt every step, then SDPA over it (q as [1, Hkv, G, D]).
    q4 = q.reshape(1, HKV, G, D)
    kbuf = torch.empty(HKV, n, D, dtype=torch.float16, device="cuda")
    vbuf = torch.empty_like(kbuf)

    def expand_triton(c):
        ka.dequantize_kv(c, 0, n, kbuf, vbuf)
        return F.scaled_dot_product_attention(q4, kbuf[None], vbuf[None], scale=D**-0.5)

    def expand_eager(c):
        k = dequantize_keys(c.k_data, c.k_scale, c.k_zero, 4, GROUP).half()
        v = dequantize_values(c.v_data, c.v_scale, c.v_zero, 4).half()
        return F.scaled_dot_product_attention(q4, k[None], v[None], scale=D**-0.5)

    ms_t = bench_rotating(expand_triton, caches)
    rows.append(_decode_row("re-expand-triton", n, ms_t, nbytes, copy, speedup_of_codes=round(ms_t / ms, 2)))
    if n <= 1 << 20:
        ms_e = bench_rotating(expand_eager, caches)
        rows.append(
            _decode_row("re-expand-eager", n, ms_e, nbytes, copy, speedup_of_codes=round(ms_e / ms, 2))
        )

    fp_bytes = 2 * HKV * n * D * 2
    fp_caches = rotating(lambda: torch.randn(2, 1, HKV, n, D, device="cuda", dtype=torch.float16), fp_bytes)
    ms_f = bench_rotating(
        lambda kv: F.scaled_dot_product_attention(q4, kv[0], kv[1], scale=D**-0.5), fp_caches
    )
    rows.append(_decode_row("sdpa-fp16-cache", n, ms_f, fp_bytes, copy, speedup_of_codes=round(ms_f / ms, 2),
                            fp16_at_copy_bw_ms=round(fp_bytes / copy / 1e6, 4)))  # fmt: skip
    print(f"decode {n}: codes {ms:.3f} ms, re-expand {ms_t:.3f} ms, fp16 sdpa {ms_f:.3f} ms", flush=True)
    return rows


def prefill_rows(t: int = PREFILL_T, n: int = PREFILL_N) -> list[dict]:
    flops = 4 * t * HKV * G * n * D
    q = torch.randn(t, HKV * G, D, device="cuda", dtype=torch.float16)
    cache = random_cache(n)
    rows = []

    def row(variant, fn, **extra):
        try:
            ms = bench(fn)
        except Exception as e:
            rows.append({"kind": "prefill", "variant": variant, "error": repr(e)[:300], **extra})
            return
        rows.append({"kind": "prefill", "variant": variant, "t": t, "context": n, "ms": round(ms, 3),
                     "TFLOPs": round(flops / ms / 1e9, 1), **extra})  # fmt: skip
        print(f"prefill {variant} {extra}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)

    qh = q.reshape(t, HKV, G, D).permute(1, 0, 2, 3).reshape(1, HKV, t * G, D)
    k = torch.randn(1, HKV, n, D, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(backend):
            row(f"sdpa-fp16-{name}", lambda: F.scaled_dot_product_attention(qh, k, v, scale=D**-0.5))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        row("sdpa-fp16-cudnn-gqa", lambda: F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k, v, scale=D**-0.5, enable_gqa=True))  # fmt: skip
    del k, v
    for kernel in ("cudnn", "flash"):
        for slab in (256 << 20, 1 << 30):
            row("slab", lambda kernel=kernel, slab=slab: ka.prefill_attention(
                q, cache, D**-0.5, slab_bytes=slab, kernel=kernel), kernel=kernel, slab_bytes=slab)  # fmt: skip
    for bm, bn, warps, stages in ((128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)):
        row("fused-codes", lambda bm=bm, bn=bn, warps=warps, stages=stages: ka.decode_attention(
            q, cache, D**-0.5, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages),
            block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)  # fmt: skip
    k, v = torch.randn(2, HKV, 32768, D, device="cuda", dtype=torch.float16)
    row("quantize_kv-32K", lambda: quantize_kv(k, v, 4, GROUP))
    row("quantize_kv-32K-reference", lambda: quantize_reference(k, v, 4, GROUP))
    return rows


def _table(result: dict) -> str:
    lines = [f"{result['device']}  copy {result['copy_bandwidth_GBps']:.0f} GB/s"]
    for r in result["rows"]:
        if r["kind"] == "decode":
            lines.append(f"decode {r['variant']:<18} N={r['context']:>8} {r['ms']:8.3f} ms {r['GBps']:7.0f} GB/s "
                         f"{r['pct_copy']:5.1f}% copy  x32 layers {r['model_ms']:7.2f} ms")  # fmt: skip
        elif r["kind"] == "prefill" and "ms" in r:
            extra = {
                k: v for k, v in r.items() if k not in ("kind", "variant", "t", "context", "ms", "TFLOPs")
            }
            lines.append(f"prefill {r['variant']:<26} {r['ms']:8.2f} ms {r['TFLOPs']:6.0f} TFLOP/s {extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON")
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument(
        "--sweep-contexts",
        type=int,
        nargs="+",
        default=[256 << 10, 1 << 20],
        help="contexts of the decode config sweep; the last one's fastest config runs the decode part",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["check", "sweep", "decode", "prefill"])
    args = p.parse_args(argv)
    device, date, copy = gpu_header()
    rows: list[dict] = []
    cfg: dict = {}

    def section(name: str, fn) -> None:
        """Run one part; a failure is recorded and the other parts still run."""
        if name in args.skip:
            return
        try:
            rows.extend(fn())
        except Exception as e:
            traceback.print_exc()
            rows.append({"kind": "error", "section": name, "error": repr(e)[:500]})

    def sweep() -> list[dict]:
        res = []
        for n in args.sweep_contexts:
            rows_n, best = decode_sweep(n, copy)
            res += rows_n
            print(f"fastest decode config at {n}: {best}", flush=True)
            torch.cuda.empty_cache()
        cfg.update(best)
        return res

    section("check", check_rows)
    for r in rows:
        print(r, flush=True)
    section("sweep", sweep)
    section("decode", lambda: decode_rows(tuple(args.contexts), copy, cfg))
    section("prefill", prefill_rows)
    _, result = write_result(
        args.out, "attention", device, date, copy, argv, {"decode_config": cfg, "rows": rows}
    )
    print(_table(result))


if __name__ == "__main__":
    main()
