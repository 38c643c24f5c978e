"""End-to-end decode latency, pre-fill throughput and capacity for a Llama-3-8B-shaped model (synthetic weights).

Three decoders in one run, each timed per token at a fixed context (the cache is rolled back after every step):
- ``fp16-full``: fp16 weights, every head a retrieval head in an fp16 cache, flash attention (SDPA);
- ``reexpand-kv4``: our W8A8KV4 + DuoAttention model, but the 4-bit prefix is de-quantized to fp16 in full at
  every step before attention: the reference demo's scheme;
- ``duo-w8a8kv4``: the same model reading the 4-bit cache directly;
- ``duo-w8a8kv4-graph``: the same step replayed as a CUDA graph (``duo_qserve.decode_graph``).
With ``--key-groups 128,64`` the W8A8KV4 decoders run once per key group (tokens per per-channel key scale); rows
of a group other than the first are named ``<method>-kg<group>``, and each row's floor counts its own bytes.
Long contexts are filled with synthetic quantized data (random codes and scales): a real multi-million-token
pre-fill of an 8B model takes longer than one device call. The real pre-fill is measured separately.
The floor of a decode step is (bytes of weights read + bytes of KV read) / measured copy bandwidth.

    python -m duo_qserve.bench.e2e --out DIR [--contexts 32768,131072,...] [--pattern DIR]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from duo_qserve.bench.common import copy_bandwidth_gbps
from duo_qserve.cache import CacheConfig, CacheSpec, DuoKVCache, FullKVCache
from duo_qserve.decode_graph import GraphedDecoder
from duo_qserve.environment import commit
from duo_qserve.kernels import kv_attention
from duo_qserve.kernels.attention import dense_attention
from duo_qserve.kernels.kv_attention import QuantArena
from duo_qserve.loading import load_model
from duo_qserve.patterns import load_pattern, reorder_heads
from duo_qserve.planner import workspace_bytes


def fill_synthetic(cache: DuoKVCache, n_tokens: int) -> None:
    """Random codes, plausible scales (keys ~N(0, 1) per channel group, values ~N(0, 0.5)), fp tails and rings."""
    for layer in cache.layers:
        for name, t in layer.items():
            if t.dtype == torch.uint8:
                t.random_(0, 256)
            elif name.endswith("_scale"):
                t.uniform_(0.05, 0.3)
            elif name.endswith("_zero"):
                t.uniform_(-1.5, -0.5)
            else:
                t.normal_(0, 0.5)
    cache.set_length(n_tokens)


def reexpand_prefix_attention(
    q: torch.Tensor, arena: QuantArena, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference demo's way: de-quantize the whole prefix into fp16 buffers (our Triton de-quantizer, faster
    than the demo's), then flash attention over them."""
    n_quant = arena.n_quant
    kbuf = torch.empty((arena.k_data.shape[0], n_quant, q.shape[-1]), dtype=q.dtype, device=q.device)
    vbuf = torch.empty_like(kbuf)
    kv_attention.dequantize_kv(arena, 0, n_quant, kbuf, vbuf)
    return dense_attention(q, kbuf, vbuf, n_ctx=n_quant, sm_scale=sm_scale)


def time_decode(model, cache, context: int, steps: int = 8, warmup: int = 3) -> float:
    """Median ms of one decode step at ``context`` tokens (the cache is rolled back after each step)."""
    token = torch.tensor([1], device="cuda")
    times = []
    with torch.inference_mode():
        for i in range(warmup + steps):
            cache.set_length(context)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            model(token, cache, last_only=True)
            e1.record()
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(e0.elapsed_time(e1))
    cache.set_length(context)
    return sorted(times)[len(times) // 2]


def time_decode_graph(model, cache, context: int, steps: int = 8, warmup: int = 3) -> float:
    """``time_decode`` for the CUDA-graph step: the first step captures the graph, the rest replay it. Timed from
    writing the token to the logits, host work included (as ``Engine.ask`` runs it)."""
    decoder = GraphedDecoder(model, cache)
    times = []
    for i in range(warmup + steps):
        cache.set_length(context)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        decoder.step(1)
        e1.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(e0.elapsed_time(e1))
    assert decoder.replays >= steps, "the graph did not replay"
    cache.set_length(context)
    return sorted(times)[len(times) // 2]


def weight_bytes_read(model) -> int:
    """Bytes of every weight a decode step reads (all linears + lm_head; the embedding row is negligible)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if model.args.tie_word_embeddings:
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total


def kv_bytes_read(spec: CacheSpec, context: int) -> int:
    """Bytes of the cache a decode step reads at ``context`` tokens (valid codes, scales, tails, sinks, rings)."""
    full = CacheSpec(spec.args, spec.retrieval_heads, spec.config, context, spec.dtype).nbytes
    return full


CAPACITY_MARGIN = 256 << 20  # allocator fragmentation and the decode step's small buffers


def measure_workspace(model, margs, heads, config, chunk: int) -> int:
    """Peak bytes one real pre-fill chunk allocates beyond the weights and its cache, measured on the second chunk
    (over a quantized prefix). It does not grow with the prefix: the prefix is attended slab by slab through one
    bounded buffer."""
    cache = DuoKVCache(CacheSpec(margs, heads, config, 2 * chunk + 256, torch.float16), "cuda")
    ids = torch.randint(0, margs.vocab_size, (2 * chunk,), device="cuda")
    with torch.inference_mode():
        model(ids[:chunk], cache, last_only=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model(ids[chunk:], cache, last_only=True)
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def measure_capacity(args, model, margs, heads, config, w_q: int, bw: float, rows: list) -> dict:
    """The largest cache that fits beside the W8A8 weights and the measured workspace of a pre-fill chunk; then a
    real chunk is pre-filled into that cache (the workspace really fits beside it), the cache is filled with
    synthetic codes and decoded, eagerly and under CUDA graphs (rows added)."""
    workspace = measure_workspace(model, margs, heads, config, args.chunk_size)
    torch.cuda.reset_peak_memory_stats()
    free = torch.cuda.mem_get_info()[0]
    budget = free - workspace - CAPACITY_MARGIN
    lo, hi = 0, 1 << 24
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        lo, hi = (
            (mid, hi) if CacheSpec(margs, heads, config, mid, torch.float16).nbytes <= budget else (lo, mid)
        )
    cap_spec = CacheSpec(margs, heads, config, lo, torch.float16)
    cache = DuoKVCache(cap_spec, "cuda")
    ids = torch.randint(0, margs.vocab_size, (args.chunk_size,), device="cuda")
    with torch.inference_mode():
        model(ids, cache, last_only=True)  # a real chunk beside the full-size cache
    torch.cuda.synchronize()
    fill_synthetic(cache, lo - 1024)
    cap_ms = time_decode(model, cache, lo - 1024, steps=3, warmup=1)
    graph_ms = time_decode_graph(model, cache, lo - 1024, steps=3, warmup=1)
    capacity = {
        "max_tokens": lo,
        "decoded_at": lo - 1024,
        "ms_per_token": cap_ms,
        "graph_ms_per_token": graph_ms,
        "floor_ms": (w_q + kv_bytes_read(cap_spec, lo)) / bw * 1000,
        "cache_bytes": cap_spec.nbytes,
        "prefill_workspace_bytes": workspace,
        "margin_bytes": CAPACITY_MARGIN,
        "free_before_cache": free,
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "gpu_total": torch.cuda.mem_get_info()[1],
        "note": f"a real {args.chunk_size}-token pre-fill chunk ran in this cache beside it; then the cache was "
        "filled with synthetic quantized data and decoded",
    }
    for method, ms in (("duo-w8a8kv4", cap_ms), ("duo-w8a8kv4-graph", graph_ms)):
        rows.append(
            {"method": method, "context": lo - 1024, "ms_per_token": ms, "floor_ms": capacity["floor_ms"]}
        )
    print(capacity, flush=True)
    del cache
    gc.collect()
    torch.cuda.empty_cache()
    return capacity


def run(args) -> dict:
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth_gbps() * 1e9  # bytes/s
    rows = []
    pattern = load_pattern(args.pattern)
    mask, sparsity = pattern.retrieval_mask(args.sparsity)
    key_groups = [int(g) for g in args.key_groups.split(",")]
    config = CacheConfig(
        kv_bits=4, key_group=key_groups[0], sink_tokens=pattern.sink_size, recent_tokens=pattern.recent_size
    )
    contexts = [int(c) for c in args.contexts.split(",")]
    methods = set(args.methods.split(","))

    loaded = load_model("synthetic:llama-3-8b", "cuda", torch.float16)
    model = loaded.model
    margs = model.args

    # fp16 full attention, as long as its cache fits next to the fp16 weights
    w_fp16 = weight_bytes_read(model)
    for ctx in contexts if "fp16-full" in methods else []:
        free = torch.cuda.mem_get_info()[0] - workspace_bytes(margs, 1, 2)
        if ctx * 131072 > free:
            rows.append(
                {"method": "fp16-full", "context": ctx, "ms_per_token": None, "note": "does not fit (OOM)"}
            )
            continue
        cache = FullKVCache(margs, ctx + 16, "cuda", torch.float16)
        for layer in cache.layers:
            for t in layer.values():
                t.normal_(0, 0.5)
        ms = time_decode(model, cache, ctx)
        floor = (w_fp16 + cache.spec.nbytes * ctx / cache.spec.capacity) / bw * 1000
        rows.append({"method": "fp16-full", "context": ctx, "ms_per_token": ms, "floor_ms": floor})
        print(rows[-1], flush=True)
        del cache
        torch.cuda.empty_cache()

    # W8A8 + DuoAttention (head reordering first, then quantization, as the engine does)
    heads = reorder_heads(model, mask)
    from duo_qserve.quant.w8a8 import quantize_model_w8a8

    quantize_model_w8a8(model)
    torch.cuda.empty_cache()
    w_q = weight_bytes_read(model)
    # capacity first, while nothing else holds memory: the largest cache beside the weights and a pre-fill chunk
    capacity = (
        None if args.no_capacity else measure_capacity(args, model, margs, heads, config, w_q, bw, rows)
    )
    fast = kv_attention.quantized_prefix_attention
    decoders = (  # (method, the cache's prefix attention, timer)
        ("duo-w8a8kv4", fast, time_decode),
        ("duo-w8a8kv4-graph", fast, time_decode_graph),
        ("reexpand-kv4", reexpand_prefix_attention, time_decode),
    )
    for ctx, group in itertools.product(contexts, key_groups):
        spec = CacheSpec(margs, heads, replace(config, key_group=group), ctx + 256, torch.float16)
        if spec.nbytes > torch.cuda.mem_get_info()[0] - (2 << 30):
            continue
        floor = (w_q + kv_bytes_read(spec, ctx)) / bw * 1000
        for method, prefix_attention, timer in decoders:
            if method not in methods or (method == "reexpand-kv4" and ctx > args.reexpand_max):
                continue
            cache = DuoKVCache(spec, "cuda", prefix_attention)
            fill_synthetic(cache, ctx)
            try:
                ms = timer(model, cache, ctx)
            except torch.OutOfMemoryError:
                ms = None
            name = method if group == key_groups[0] else f"{method}-kg{group}"
            rows.append(
                {"method": name, "context": ctx, "key_group": group, "ms_per_token": ms, "floor_ms": floor}
            )
            print(rows[-1], flush=True)
            del cache
            torch.cuda.empty_cache()

    # pre-fill throughput vs chunk size: each size pre-fills the same tokens twice, the second pass timed
    by_chunk = []
    sizes = [int(c) for c in args.chunk_sizes.split(",")] if args.chunk_sizes else []
    for chunk in sizes:
        cache = DuoKVCache(
            CacheSpec(margs, heads, config, args.chunk_sweep_tokens + 256, torch.float16), "cuda"
        )
        prefill(model, cache, args.chunk_sweep_tokens, chunk)  # compiles/autotunes this chunk's shapes
        cache.reset()
        torch.cuda.reset_peak_memory_stats()
        rows_c = prefill(model, cache, args.chunk_sweep_tokens, chunk)
        seconds = sum(r["ms"] for r in rows_c) / 1000
        by_chunk.append(
            {"chunk": chunk, "tokens": args.chunk_sweep_tokens, "seconds": seconds,
             "tok_per_s": args.chunk_sweep_tokens / seconds, "peak_allocated": torch.cuda.max_memory_allocated(),
             "cache_bytes": cache.spec.nbytes}
        )  # fmt: skip
        print(by_chunk[-1], flush=True)
        del cache
        torch.cuda.empty_cache()

    # real pre-fill: random token ids through the whole model, chunk by chunk, timing each chunk
    spec = CacheSpec(margs, heads, config, args.prefill_tokens + 256, torch.float16)
    cache = DuoKVCache(spec, "cuda")
    prefill_rows = prefill(model, cache, args.prefill_tokens, args.chunk_size, args.prefill_seconds, log=True)
    done = prefill_rows[-1]["prefix"] + prefill_rows[-1]["chunk"]
    total_s = sum(r["ms"] for r in prefill_rows) / 1000
    return {
        "device": dev,
        "date": datetime.date.today().isoformat(),
        "commit": commit(),
        "command": " ".join(["python -m duo_qserve.bench.e2e", *sys.argv[1:]]),
        "model_shape": "llama-3-8b (synthetic weights)",
        "pattern": pattern.name,
        "sparsity": sparsity,
        "retrieval_heads_per_layer": heads,
        "copy_bandwidth_GBps": bw / 1e9,
        "weights_read_bytes": {"fp16": w_fp16, "w8a8": w_q},
        "rows": rows,
        "capacity": capacity,
        "prefill": {
            "rows": prefill_rows,
            "tokens": done,
            "seconds": total_s,
            "tok_per_s": done / total_s,
            "estimate_1M_tokens_s": prefill_estimate_s(prefill_rows, 1 << 20),
            "by_chunk_size": by_chunk,
        },
    }


def prefill(
    model, cache: DuoKVCache, tokens: int, chunk: int, max_seconds: float = float("inf"), log: bool = False
) -> list[dict]:
    """Random token ids through the whole model into ``cache``, chunk by chunk; one timed row per chunk (stops
    after the chunk that passes ``max_seconds``)."""
    ids = torch.randint(0, model.args.vocab_size, (tokens,), device="cuda")
    rows, t_start = [], time.perf_counter()
    with torch.inference_mode():
        for start in range(0, tokens, chunk):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            model(ids[start : start + chunk], cache, last_only=True)
            e1.record()
            torch.cuda.synchronize()
            n = min(chunk, tokens - start)
            ms = e0.elapsed_time(e1)
            rows.append({"prefix": start, "chunk": n, "ms": ms, "tok_per_s": n / ms * 1000})
            if log:
                print(rows[-1], flush=True)
            if time.perf_counter() - t_start > max_seconds:
                break
    return rows


def prefill_estimate_s(prefill_rows: list[dict], tokens: int) -> float | None:
    """Seconds to pre-fill ``tokens`` from the measured per-chunk cost curve: chunk time grows linearly with the
    prefix (attention over it), so fit ms = a + b * prefix and sum the chunks. The first two chunks are skipped: the
    first compiles and autotunes the dense kernels, the second the quantized-prefix path. None when fewer than two
    chunks remain to fit a line through."""
    rows = prefill_rows[2:]
    if len(rows) < 2:
        return None
    xs = torch.tensor([r["prefix"] for r in rows], dtype=torch.float64)
    ys = torch.tensor([r["ms"] for r in rows], dtype=torch.float64)
    b = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    a = float(ys.mean()) - b * float(xs.mean())
    chunk = rows[0]["chunk"]
    return sum(a + b * p for p in range(0, tokens, chunk)) / 1000


def plot(result: dict, path: Path) -> None:
    """Decode ms/token vs context for each method (with the floor), pre-fill tokens/s vs prefix and vs chunk
    size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.5))
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        pts = sorted(
            (r["context"], r["ms_per_token"])
            for r in result["rows"]
            if r["method"] == method and r["ms_per_token"]
        )
        if pts:
            ax1.plot(*zip(*pts, strict=True), marker="o", label=method)
    floor = sorted(
        {
            (r["context"], r["floor_ms"])
            for r in result["rows"]
            if r["method"] in ("duo-w8a8kv4", "duo-w8a8kv4-graph")
        }
    )
    if floor:
        ax1.plot(*zip(*floor, strict=True), "k--", label="floor (W8A8KV4 bytes / copy bandwidth)")
    ax1.set(xscale="log", xlabel="context tokens", ylabel="ms per token", title=f"decode, {result['device']}")
    ax1.legend(fontsize=8)
    pre = result["prefill"]["rows"][1:]  # the first chunk compiles and autotunes
    if pre:
        ax2.plot([r["prefix"] for r in pre], [r["tok_per_s"] for r in pre], marker=".")
        ax2.set(
            xlabel="prefix tokens",
            ylabel="pre-fill tokens/s",
            title=f"pre-fill, {pre[0]['chunk']}-token chunks",
        )
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "pre-fill vs prefix: one chunk or none in this run", ha="center", va="center")
    sweep = result["prefill"].get("by_chunk_size") or []
    if sweep:
        ax3.plot([r["chunk"] for r in sweep], [r["tok_per_s"] for r in sweep], marker="o")
        for r in sweep:
            ax3.annotate(f"{r['peak_allocated'] / 2**30:.1f} GiB", (r["chunk"], r["tok_per_s"]), fontsize=7)
        tokens = sweep[0]["tokens"]
        ax3.set(xscale="log", xlabel="chunk tokens", ylabel="pre-fill tokens/s",
                title=f"pre-fill of {tokens} tokens vs chunk size (peak memory)")  # fmt: skip
    else:
        ax3.set_axis_off()
        ax3.text(0.5, 0.5, "pre-fill vs chunk size: not measured in this run", ha="center", va="center")
    fig.suptitle("Llama-3-8B shape, synthetic weights")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def model_parser(doc: str, contexts: str) -> argparse.ArgumentParser:
    """The arguments every decode benchmark takes (output folder, pattern, contexts)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--pattern", required=True, help="an attention pattern dir for the model shape")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--contexts", default=contexts)
    return p


def main(argv=None) -> int:
    p = model_parser(__doc__, "32768,131072,262144,524288,1048576,2097152,3145728")
    p.add_argument("--reexpand-max", type=int, default=1048576)
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--prefill-tokens", type=int, default=262144)
    p.add_argument("--prefill-seconds", type=float, default=120.0)
    p.add_argument(
        "--chunk-sizes", default="2048,4096,8192,16384,32768",
        help="pre-fill throughput vs chunk size ('' to skip)",
    )  # fmt: skip
    p.add_argument("--chunk-sweep-tokens", type=int, default=65536, help="tokens pre-filled per chunk size")
    p.add_argument("--methods", default="fp16-full,duo-w8a8kv4,duo-w8a8kv4-graph,reexpand-kv4")
    p.add_argument("--no-capacity", action="store_true", help="skip the capacity measurement")
    p.add_argument(
        "--key-groups", default="128",
        help="key groups the W8A8KV4 decoders run with, comma-separated; the first one also for capacity and pre-fill",
    )  # fmt: skip
    p.add_argument("--plot", type=Path, default=None, help="only re-draw the PNG of an existing decode JSON")
    a = p.parse_args(argv)
    if a.plot:
        plot(json.loads(a.plot.read_text()), a.plot.with_suffix(".png"))
        return 0
    result = run(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = result["device"].lower().replace(" ", "-")
    outputs = [("decode", result)]
    if result["capacity"] is not None:
        outputs.append(("capacity", {**result, "max_tokens": result["capacity"]["max_tokens"]}))
    for kind, payload in outputs:
        path = out / f"{kind}-{slug}-{result['date']}.json"
        path.write_text(json.dumps(payload, indent=2))
        print("wrote", path)
    try:
        plot(result, out / f"decode-{slug}-{result['date']}.png")
    except ImportError:
        print("matplotlib is not installed: no plot (re-draw later with --plot)")
    print(f"{'method':<19}{'context':>10}{'ms/token':>10}{'floor ms':>10}")
    for r in result["rows"]:
        ms = "-" if r["ms_per_token"] is None else f"{r['ms_per_token']:.2f}"
        print(f"{r['method']:<19}{r['context']:>10}{ms:>10}{r.get('floor_ms', 0):>10.2f}")
    if result["capacity"] is not None:
        print(f"capacity {result['capacity']['max_tokens']:,} tokens")
    print(f"pre-fill {result['prefill']['tok_per_s']:.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
