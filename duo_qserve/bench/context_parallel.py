"""Context parallelism against the single-device engine, side by side in one run: pre-fill tokens/s of a document
of ``--context`` tokens and decode ms/token after it, and each engine's capacity per rank and over every rank.

    torchrun --nproc-per-node 1 -m duo_qserve.bench.context_parallel --context 65536
    torchrun --nproc-per-node 4 -m duo_qserve.bench.context_parallel --context 262144

At world size 1 the plain engine and the context-parallel engine (``ShardedKVCache`` over one rank: a collective
per layer) run on the same device one after the other, from the same synthetic weights, each decoding through its
CUDA graph (the context-parallel one captures the all-gather): the difference is what the context-parallel path
costs where it buys nothing, reported as ratios to the plain engine. Each engine that decodes through a graph then
decodes the same steps again from the document's checkpoint eagerly (no graph), for the graph's speed-up and the
largest difference between the two paths' logits (taken in untimed passes of the same steps); the plain engine's
difference is the yardstick for the context-parallel one's, since in 16-bit arithmetic the fused graphed step and
the eager step round differently, and an int8 activation or a 4-bit code that lands on the other side of a boundary
carries that on through the layers and the steps. At world size N only the
context-parallel engine runs (every rank holds a share), and the result says how many tokens each rank and all of
them hold. The document is random token ids and decode steps feed the document's ids back (no sampling), so every
rank runs the same steps; each timed step reads its logits back to the host, as an answer does. ``decode_graph_replays`` counts the timed steps that replayed a graph.
Rank 0 writes the result.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import sys
import time

import torch

from duo_qserve.bench.common import gpu_header, write_result
from duo_qserve.distributed import ContextGroup
from duo_qserve.engine import Engine, EngineSettings
from duo_qserve.options import add_engine_args, settings_from_args

DEFAULTS = EngineSettings(model="synthetic:llama-3-8b", pattern=None, w8a8=True)


def measure(engine: Engine, context: int, steps: int) -> dict:
    """Warm the engine up, pre-fill ``context`` random ids, then time ``steps`` decode steps after them; an engine
    with a graph times them eagerly too."""
    engine.warm_up()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(engine.args.vocab_size, (context + steps,), generator=gen).tolist()
    info = engine.ingest(ids[:context])
    replays = engine._decoder.replays if engine._decoder else 0
    decode_s = _time_decode(engine, ids[context:])
    row = {"decode_ms_per_token": decode_s * 1000 / steps, "decode_graph": engine.decode_graph,
           "decode_graph_replays": (engine._decoder.replays if engine._decoder else 0) - replays}  # fmt: skip
    if engine.decode_graph:
        logits = _decode_logits(engine, ids[context:])
        engine.decode_graph = False
        eager_s = _time_decode(engine, ids[context:])
        eager_logits = _decode_logits(engine, ids[context:])
        engine.decode_graph = True
        row |= {
            "decode_eager_ms_per_token": eager_s * 1000 / steps,
            "graph_vs_eager_max_abs_logit_diff": (logits - eager_logits).abs().max().item(),
            "max_abs_logit": eager_logits.abs().max().item(),
        }
    stats = engine.stats()
    ranks = stats["ranks"]
    return {
        "pattern": stats["pattern"],
        "sparsity": stats["sparsity"],
        "prefill_s": info.prefill_seconds,
        "prefill_tok_per_s": context / info.prefill_seconds,
        **row,
        "capacity_tokens": ranks["capacity_tokens"],
        "capacity_tokens_per_rank": ranks["capacity_tokens_per_rank"],
        "cache_bytes_per_rank": sum(v for k, v in ranks["memory_per_rank"].items() if k != "weights"),
        "cache_bytes_total": sum(v for k, v in ranks["memory_total"].items() if k != "weights"),
        "world_size": ranks["world_size"],
    }


def _time_decode(engine: Engine, tokens: list[int]) -> float:
    """Seconds for decode steps of ``tokens`` after the document's checkpoint, each step's logits read back to the
    host, as sampling does, and nothing else done in the timed loop."""
    engine.cache.restore()
    with torch.inference_mode():
        _sync(engine)
        t0 = time.perf_counter()
        for token in tokens:
            engine._decode_step(token)[-1, 0].item()
        return time.perf_counter() - t0


def _decode_logits(engine: Engine, tokens: list[int]) -> torch.Tensor:
    """The logits [steps, vocab] of the same steps, untimed (a copy per step: a replayed graph overwrites its
    logits)."""
    engine.cache.restore()
    with torch.inference_mode():
        return torch.stack([engine._decode_step(token)[-1].clone() for token in tokens])


def _sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def run(args: argparse.Namespace, group: ContextGroup) -> dict:
    settings = settings_from_args(args, DEFAULTS)
    rows = []
    kinds = ["plain", "context-parallel"] if group.world_size == 1 else ["context-parallel"]
    for kind in kinds:  # one engine at a time: each may plan the whole device for its cache
        engine = Engine.from_settings(settings, group if kind == "context-parallel" else None)
        if engine.max_document_tokens < args.context:
            raise SystemExit(
                f"{args.context:,} tokens do not fit: the {kind} engine holds {engine.max_document_tokens:,} "
                f"document tokens (raise --max-tokens, or use fewer --context)"
            )
        rows.append({"engine": kind} | measure(engine, args.context, args.steps))
        if group.is_leader:
            print(rows[-1], flush=True)
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    fields = {
        "launch": f"torchrun --nproc-per-node {group.world_size}",
        "model": settings.model, "kv_bits": settings.kv_bits, "w8a8": settings.w8a8, "context": args.context,
        "steps": args.steps,
        "rows": rows,
    }  # fmt: skip
    if len(rows) == 2:
        fields["ratios"] = ratios(*rows)
    return fields


def ratios(plain: dict, cp: dict) -> dict:
    """The context-parallel engine at world size 1 over the plain engine (same run, same device), and its eager
    decode over its graph's (and the plain engine's, where both decode through graphs)."""
    out = {
        "prefill_tok_per_s_cp_over_plain": cp["prefill_tok_per_s"] / plain["prefill_tok_per_s"],
        "decode_ms_cp_over_plain": cp["decode_ms_per_token"] / plain["decode_ms_per_token"],
    }
    if "decode_eager_ms_per_token" in cp:
        out["decode_ms_cp_eager_over_cp_graph"] = cp["decode_eager_ms_per_token"] / cp["decode_ms_per_token"]
    if "decode_eager_ms_per_token" in plain:
        out["decode_ms_plain_eager_over_plain_graph"] = (
            plain["decode_eager_ms_per_token"] / plain["decode_ms_per_token"]
        )
    return out


def report(fields: dict) -> None:
    """Print what was measured: per engine, pre-fill, decode (and how: graph replays or eager), capacity; then
    the ratios."""
    for r in fields["rows"]:
        how = f"{r['decode_graph_replays']} of {fields['steps']} steps replayed a graph"
        print(f"{r['engine']:>16} x{r['world_size']}: pre-fill {r['prefill_tok_per_s']:.0f} tok/s, "
              f"decode {r['decode_ms_per_token']:.2f} ms/token ({how}), {r['capacity_tokens']:,} tokens "
              f"({r['capacity_tokens_per_rank']:,} a rank)")  # fmt: skip
        if "decode_eager_ms_per_token" in r:
            print(f"{'':>20} the same steps eagerly: {r['decode_eager_ms_per_token']:.2f} ms/token; logits "
                  f"differ from the graph's by at most {r['graph_vs_eager_max_abs_logit_diff']:.3g} (largest "
                  f"{r['max_abs_logit']:.3g})")  # fmt: skip
    for name, value in fields.get("ratios", {}).items():
        print(f"{name}: {value:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, DEFAULTS)
    p.add_argument("--context", type=int, default=32768, help="document tokens to pre-fill")
    p.add_argument("--steps", type=int, default=64, help="decode steps to time after the document")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    group = ContextGroup.from_env("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    try:
        if torch.cuda.is_available() and not a.cpu:
            device, date, copy = gpu_header()
        else:  # a smoke run: no copy ceiling
            device, date, copy = "cpu", datetime.date.today().isoformat(), 0.0
        fields = run(a, group)
        if group.is_leader:
            write_result(a.out, f"context-parallel-{group.world_size}x", device, date, copy, argv, fields,
                         module="context_parallel")  # fmt: skip
            report(fields)
    finally:
        group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
