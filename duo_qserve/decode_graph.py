"""One decode step (one token) of the DuoAttention cache as a CUDA graph.

At batch 1 a decode step of an 8B model is launch-bound: per layer a dozen Triton launches plus dozens of small
torch ops. ``GraphedDecoder`` captures the whole step once and replays it per token. A graph replays fixed
launches over fixed addresses, so everything that varies per token lives in device buffers: the token id and its
position (``[1]`` int64, written with ``fill_`` before each replay, no host sync), and from the position the
retrieval heads' held count ``held = cache.retrieval_len_at(pos)`` (``pos`` itself; in a context-parallel cache
the rank's share, ``duo_qserve.distributed``), the new token's fp-tail slot ``held % key_group``, whether the cache
keeps the new token (always; in a context-parallel cache on the rank that owns it), the quantized prefix length
``n_quant`` (int32) and the streaming ring slot ``(pos - sink) % recent``.

Each layer's attention is ``kernels.decode_step`` (the model hands it q and k before RoPE: ``rotates_qk``), three
launches for all heads: a fused kernel that applies RoPE, attends the retrieval heads' fp tail (masked to the
held slots of the fixed ``key_group``-slot buffer, and the new token where kept) and the streaming heads' sinks +
full ring + new token, and writes the new k/v into the tail or ring slot; the split-K code kernel over the
quantized prefix, its grid sized for the whole cache; and one merge of all partials into the layer's output and
lse. Then ``cache.step_output``: as is in one process; in a context-parallel cache the retrieval heads merged over
the ranks by one all-gather, which the graph captures (NCCL). When the host-tracked held count fills the tail, the
group is quantized into the arena eagerly, between replays (once per ``key_group`` tokens held:
``DuoKVCache.commit_tail_group``). Streaming heads need a full ring (``sink + recent`` tokens held):
attention is then over every sink and ring slot + the new token, which then replaces the oldest ring slot.

The graph reads only the cache's preallocated tensors, the weights and the buffers above, so it stays valid
across ``reset``/``checkpoint``/``restore``; a new cache or model needs a new ``GraphedDecoder``. Steps the graph
does not cover (CPU, ``kv_bits=16``, a ring not yet full) run the eager ``model(...)``; ``use_graph=False`` runs the
graph-safe step without a graph (its torch reference on CPU), which tests hold to the eager step. With context
parallelism every rank decides from the same global length, so all ranks capture, replay and fall back at the same
steps, and their graphs' all-gathers pair up.
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
        self.cache, c = cache, cache.config
        held = cache.retrieval_len_at(pos)  # int64 [1], as every length below
        tail = held % c.key_group
        keep = cache.retrieval_len_at(pos + 1) - held  # 1 where the new token is held here
        self.slots = decode_step.StepSlots(tail, keep, (pos - c.sink_tokens) % c.recent_tokens)
        self.n_quant = (held - tail).to(torch.int32)

    def advance(self, n_tokens: int) -> None:
        pass

    def attend(self, layer: int, q, k, v, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        step_layer = self.cache.step_layer(layer, self.n_quant)
        out, lse = decode_step.attend(q, k, v, rope, step_layer, self.slots, self.cache.sm_scale)
        return self.cache.step_output(layer, out, lse)


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
        """Host bookkeeping: one more token; quantize the tail into the arena when it has just filled (the cache
        kept the new token, and its held count reached a multiple of the key group)."""
        cache = self.cache
        held = cache.retrieval_len
        cache.advance(1)
        if cache.retrieval_len > held and cache.retrieval_len % cache.config.key_group == 0:
            cache.commit_tail_group()
