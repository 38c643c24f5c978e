"""Graphed against eager decode on CUDA: logit differences and step times of two ways to decode a token.

A small synthetic W8A8 model at 4 and 8 bits, then (with ``--pattern``) synthetic Llama-3-8B W8A8 KV4: each pair
of steppers starts from the same pre-filled state and is fed the first stepper's greedy tokens.

    python -m duo_qserve.bench.decode_check [--pattern DIR] [--steps 300] [--start 4000]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch

from duo_qserve.cache import CacheConfig, CacheSpec, DuoKVCache
from duo_qserve.decode_graph import GraphedDecoder
from duo_qserve.kernels import kv_attention
from duo_qserve.kernels.kv_attention import QuantArena
from duo_qserve.loading import load_model
from duo_qserve.model import ModelArgs, Transformer
from duo_qserve.patterns import load_pattern, reorder_heads
from duo_qserve.quant.w8a8 import quantize_model_w8a8

Stepper = Callable[[int], torch.Tensor]  # token -> logits [1, vocab]


def reference_prefix(
    q: torch.Tensor, arena: QuantArena, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized prefix de-quantized in fp32 (``kv_attention.reference``): the noise floor of the kernels."""
    out, lse = kv_attention.reference(q.float(), arena, sm_scale)
    return out.to(q.dtype), lse


# stepper name -> (how the cache attends over its quantized prefix, whether the step is graph-safe, graphed)
STEPPERS = {
    "eager": (kv_attention.quantized_prefix_attention, False, False),
    "eager-reference-prefix": (reference_prefix, False, False),
    "graph": (kv_attention.quantized_prefix_attention, True, True),
    "graph-safe-eager": (kv_attention.quantized_prefix_attention, True, False),
}


def stepper(name: str, model, cache: DuoKVCache) -> Stepper:
    """Stepper ``name`` (``STEPPERS``) over a copy of ``cache``'s state, so that two steppers start alike."""
    prefix_attention, graph_safe, graphed = STEPPERS[name]
    twin = DuoKVCache(cache.spec, cache.device, prefix_attention)
    for x, y in zip(cache.layers, twin.layers, strict=True):
        for tensor_name in x:
            y[tensor_name].copy_(x[tensor_name])
    twin.set_length(cache.seq_len)
    if graph_safe:
        return GraphedDecoder(model, twin, use_graph=graphed).step

    def eager(token: int) -> torch.Tensor:
        return model(torch.tensor([token], device=twin.device), twin, last_only=True)

    return eager


def compare(
    model, cache: DuoKVCache, prompt: torch.Tensor, steps: int, a: str = "eager", b: str = "graph"
) -> dict:
    """Pre-fill ``prompt`` into ``cache`` (once; it is checkpointed), then decode ``steps`` tokens with steppers
    ``a`` and ``b``, each on its own copy of the pre-filled state, both fed ``a``'s greedy tokens. Returns logit
    differences and median step times."""
    with torch.inference_mode():
        if cache.seq_len == 0:
            for i in range(0, len(prompt), 16384):
                model(prompt[i : i + 16384], cache, last_only=True)
            cache.checkpoint()
        cache.restore()
        step_a, step_b = stepper(a, model, cache), stepper(b, model, cache)
        token, diffs, scale, agree, t_a, t_b = int(prompt[-1]), [], 0.0, 0, [], []
        for _ in range(steps):
            e = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            e[0].record()
            want = step_a(token).clone()
            e[1].record()
            e[2].record()
            got = step_b(token)
            e[3].record()
            torch.cuda.synchronize()
            t_a.append(e[0].elapsed_time(e[1]))
            t_b.append(e[2].elapsed_time(e[3]))
            diffs.append((got - want).abs().max().item())
            scale = max(scale, want.abs().max().item())
            agree += int(got.argmax() == want.argmax())
            token = int(want.argmax())
    return {
        "a": a, "b": b, "start": len(prompt), "steps": steps, "first_step_diff": diffs[0],
        "max_abs_diff": max(diffs), "max_abs_logit": scale, "argmax_agree": agree / steps,
        "a_ms": sorted(t_a)[steps // 2], "b_ms": sorted(t_b)[steps // 2],
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m duo_qserve.bench.decode_check", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--pattern", default=None, help="pattern directory: also check synthetic Llama-3-8B with it"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--start", type=int, default=4000, help="prompt tokens pre-filled before decoding")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    results = {}
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=1000, dim=512, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=64,
                     intermediate_size=1024)  # fmt: skip
    model = Transformer(args).half().cuda().eval()
    heads = reorder_heads(
        model, np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=bool)
    )
    quantize_model_w8a8(model)
    prompt = torch.randint(0, args.vocab_size, (a.start,), device="cuda")
    for bits in (4, 8):
        spec = CacheSpec(args, heads, CacheConfig(kv_bits=bits), a.start + a.steps + 8, torch.float16)
        results[f"small-w8a8-kv{bits}"] = compare(model, DuoKVCache(spec, "cuda"), prompt, a.steps)
        print(json.dumps(results), flush=True)
    if a.pattern:
        del model
        model = load_model("synthetic:llama-3-8b", "cuda", torch.float16).model
        pattern = load_pattern(a.pattern)
        heads = reorder_heads(model, pattern.retrieval_mask(0.5)[0])
        quantize_model_w8a8(model)
        config = CacheConfig(kv_bits=4, sink_tokens=pattern.sink_size, recent_tokens=pattern.recent_size)
        spec = CacheSpec(model.args, heads, config, a.start + a.steps + 8, torch.float16)
        prompt = torch.randint(0, model.args.vocab_size, (a.start,), device="cuda")
        cache = DuoKVCache(spec, "cuda")
        pairs = [("eager", "graph"), ("graph-safe-eager", "graph"), ("eager", "eager-reference-prefix")]
        for x, y in pairs:
            results[f"llama-3-8b-w8a8-kv4 {x} vs {y}"] = compare(model, cache, prompt, a.steps, x, y)
            print(json.dumps(results[f"llama-3-8b-w8a8-kv4 {x} vs {y}"]), flush=True)
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
