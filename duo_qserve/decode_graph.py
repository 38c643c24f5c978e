"""One decode step (one token) of the DuoAttention cache as a CUDA graph.

At batch 1 a decode step of an 8B model is launch-bound: per layer a dozen Triton launches plus dozens of small
torch ops. ``GraphedDecoder`` captures the whole step once and replays it per token. A graph replays fixed
launches over fixed addresses, so everything that varies per token lives in device buffers: the token id and its
position (``[1]`` int64, written with ``fill_`` before each replay, no host sync), and from the position the new
token's fp-tail slot ``pos % key_group``, the quantized prefix length ``n_quant`` (int32) and the streaming ring
slot ``(pos - sink) % recent``.

Each layer's attention is ``kernels.decode_step`` (the model hands it q and k before RoPE: ``rotates_qk``), three
launches for all heads: a fused kernel that applies RoPE, attends the retrieval heads' fp tail (masked to
``tail_len + 1`` slots of the fixed ``key_group``-slot buffer) and the streaming heads' sinks + full ring + new
token, and writes the new k/v into the tail or ring slot; the split-K code kernel over the quantized prefix, its
grid sized for the whole cache; and one merge of all partials into the layer's output. When the host-tracked
length fills the tail, the group is quantized into the arena eagerly, between replays (once per ``key_group``
tokens: ``DuoKVCache._append_quantized``). Streaming heads need a full ring (``sink + recent`` tokens held):
attention is then over every sink and ring slot + the new token, which then replaces the oldest ring slot.

The graph reads only the cache's preallocated tensors, the weights and the buffers above, so it stays valid
across ``reset``/``checkpoint``/``restore``; a new cache or model needs a new ``GraphedDecoder``. Steps the graph
does not cover (CPU, ``kv_bits=16``, a ring not yet full) run the eager ``model(...)``; ``use_graph=False`` runs the
graph-safe step without a graph (its torch reference on CPU), which tests hold to the eager step.
"""

from __future__ import annotations

import torch

from duo_qserve.cache import DuoKVCache
from duo_qserve.kernels import decode_step, kv_attention


class _GraphStepCache:
    """What the model sees during the graph-safe step: ``attend`` over the cache's tensors with device lengths
    (``decode_step``, which also applies RoPE). ``seq_len``/``advance`` are inert; the decoder does the host
    bookkeeping after each step."""

    seq_len = 0
    rotates_qk = True

    def __init__(self, cache: DuoKVCache, pos: torch.Tensor):
        self.cache, self.config = cache, cache.config
        c = self.config
        self.tail_idx = pos % c.key_group  # slot of the new token in the fp tail, int64 [1]
        self.n_quant = (pos - self.tail_idx).to(torch.int32)
        self.ring_idx = (pos - c.sink_tokens) % c.recent_tokens

    def advance(self, n_tokens: int) -> None:
        pass

    def attend(self, layer: int, q, k, v, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cache = self.cache
        return decode_step.attend(
            q, k, v, rope, cache.layers[layer], cache.n_retrieval[layer], self.tail_idx, self.ring_idx,
            self.n_quant, self.config.kv_bits, cache.sm_scale,
        )  # fmt: skip


class GraphedDecoder:
    """``step(token) -> logits [1, vocab]`` for ``model`` over ``cache``, replaying a CUDA graph where it can.

    The returned logits are a static buffer overwritten by the next step: consume them first. ``use_graph=False``
    runs the graph-safe step eagerly (for tests and CPU), which must equal the eager model step."""

    def __init__(self, model, cache: DuoKVCache, use_graph: bool | None = None):
        self.model, self.cache = model, cache
        self.device = cache.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.token = torch.zeros(1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        # A plain attribute: on the device once, so the step makes no host-to-device copy.
        model.inv_freq = model.inv_freq.to(self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.replays = 0

    def supported(self) -> bool:
        """Whether the next step can run graph-safe: quantized retrieval heads that the code kernel takes, a full
        streaming ring."""
        c, cache = self.cache.config, self.cache
        codes_read = c.kv_bits < 16 and kv_attention.code_kernel_fits(cache.args.head_dim)
        if any(cache.n_retrieval) and not codes_read:
            return False
        has_streaming = any(n < cache.args.n_kv_heads for n in cache.n_retrieval)
        return not has_streaming or cache.seq_len >= c.sink_tokens + c.recent_tokens

    def _forward(self) -> torch.Tensor:
        view = _GraphStepCache(self.cache, self.pos)
        h = self.model.hidden_states(self.token, view, positions=self.pos)
        return self.model.lm_head(h).float()

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        cache = self.cache
        if not self.supported():
            return self.model(torch.tensor([token], device=self.device), cache, last_only=True)
        cache.check_room(1)
        self.token.fill_(token)
        self.pos.fill_(cache.seq_len)
        if not self.use_graph:
            logits = self._forward()
        elif self.graph is None:
            logits = self._forward()  # the real step, and the warm-up (Triton autotuning, cuBLAS handles)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # capture records launches only: the cache is not touched again
                self.logits = self._forward()
            self.graph = graph
        else:
            self.graph.replay()
            self.replays += 1
            logits = self.logits
        self._after_step()
        return logits

    def _after_step(self) -> None:
        """Host bookkeeping: one more token; quantize the tail into the arena when it has just filled."""
        cache = self.cache
        cache.advance(1)
        if cache.seq_len % cache.config.key_group == 0:
            cache.commit_tail_group()


# ---------------------------------------------------------------------------------------------------- device check


def _steppers(model, cache: DuoKVCache) -> dict:
    """Ways to decode one token on ``cache``: callables token -> logits [1, vocab]."""

    def eager(token: int) -> torch.Tensor:
        return model(torch.tensor([token], device=cache.device), cache, last_only=True)

    def reference_prefix(q, *arena):
        out, lse = kv_attention.reference(q.float(), *arena)
        return out.to(q.dtype), lse

    def eager_reference_prefix(token: int) -> torch.Tensor:  # the fp32 de-quantized prefix: a noise floor
        fast = kv_attention.quantized_prefix_attention
        kv_attention.quantized_prefix_attention = reference_prefix
        try:
            return eager(token)
        finally:
            kv_attention.quantized_prefix_attention = fast

    return {
        "eager": eager,
        "eager-reference-prefix": eager_reference_prefix,
        "graph": GraphedDecoder(model, cache).step,
        "graph-safe-eager": GraphedDecoder(model, cache, use_graph=False).step,
    }


def compare(
    model, cache: DuoKVCache, prompt: torch.Tensor, steps: int, a: str = "eager", b: str = "graph"
) -> dict:
    """Pre-fill ``prompt`` into ``cache`` and a copy, then decode ``steps`` tokens on each, with steppers ``a`` and
    ``b`` (``_steppers``), both fed ``a``'s greedy tokens. Returns logit differences and median step times."""
    twin = DuoKVCache(cache.spec, cache.device)
    with torch.inference_mode():
        if cache.seq_len == 0:
            for i in range(0, len(prompt), 16384):
                model(prompt[i : i + 16384], cache, last_only=True)
            cache.checkpoint()
        cache.restore()  # every comparison starts from the pre-filled state
        for x, y in zip(cache.layers, twin.layers, strict=True):
            for name in x:
                y[name].copy_(x[name])
        twin.seq_len = cache.seq_len
        step_a, step_b = _steppers(model, cache)[a], _steppers(model, twin)[b]
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


def main(argv=None) -> int:
    """``python -m duo_qserve.decode_graph [--pattern DIR]``: graphed vs eager decode on CUDA (a small
    synthetic W8A8 model at 4 and 8 bits, then synthetic Llama-3-8B W8A8 KV4 with ``--pattern``)."""
    import argparse
    import json

    import numpy as np

    from duo_qserve.cache import CacheConfig, CacheSpec
    from duo_qserve.loading import load_model
    from duo_qserve.model import ModelArgs, Transformer
    from duo_qserve.patterns import load_pattern, reorder_heads
    from duo_qserve.quant.w8a8 import quantize_model_w8a8

    p = argparse.ArgumentParser()
    p.add_argument("--pattern", default=None)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--start", type=int, default=4000)
    a = p.parse_args(argv)
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
