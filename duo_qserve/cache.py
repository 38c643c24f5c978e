"""KV caches: the DuoAttention split cache (quantized retrieval heads + fp streaming heads) and a plain full cache.

Per layer, after head reordering, KV heads ``[0, n_retrieval)`` are retrieval heads and the rest are streaming
heads (query heads follow their KV head). Retrieval heads keep every token: whole key groups as 4/8-bit codes
(``duo_qserve.quant.kv_quant``) plus an fp tail for the group being filled; with ``kv_bits=16`` they keep the
model's dtype. Streaming heads keep the first ``sink_tokens`` and a ring of the last ``recent_tokens``; keys are
stored after RoPE, so a ring slot needs no position and the ring's order does not matter to attention.

Everything is preallocated from ``CacheSpec``: the planner and the cache read the same tensor list, so the bytes the
planner promises are the bytes the cache allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duo_qserve.kernels import kv_attention, kv_quantize
from duo_qserve.kernels.attention import dense_attention, merge, split_heads
from duo_qserve.kernels.decode_step import StepLayer
from duo_qserve.kernels.kv_attention import PrefixAttention, QuantArena
from duo_qserve.model import ModelArgs
from duo_qserve.quant.kv_quant import SCALE_DTYPE, dequantize_keys


@dataclass(frozen=True)
class CacheConfig:
    kv_bits: int = 4  # retrieval heads: 4 or 8 (quantized) or 16 (the model's dtype)
    key_group: int = 128  # tokens per per-channel key scale
    sink_tokens: int = 64
    recent_tokens: int = 256

    def __post_init__(self):
        if self.kv_bits not in (4, 8, 16):
            raise ValueError(f"kv_bits must be 4, 8 or 16, got {self.kv_bits}")
        if self.key_group <= 0 or self.sink_tokens < 0 or self.recent_tokens <= 0:
            raise ValueError("key_group and recent_tokens must be positive, sink_tokens non-negative")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    component: str  # "retrieval_kv" | "scales" | "streaming_kv"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class CacheSpec:
    """Every tensor the cache allocates, per layer, for a capacity of ``max_tokens``. ``retrieval_tokens`` (default
    ``max_tokens``) sizes the retrieval heads' token axis: a rank of a context-parallel cache holds only its share
    of the tokens there (``duo_qserve.distributed``)."""

    def __init__(
        self,
        args: ModelArgs,
        retrieval_heads: list[int],
        config: CacheConfig,
        max_tokens: int,
        dtype: torch.dtype,
        retrieval_tokens: int | None = None,
    ):
        if len(retrieval_heads) != args.n_layers:
            raise ValueError(
                f"need one retrieval-head count per layer ({args.n_layers}), got {len(retrieval_heads)}"
            )
        self.args, self.retrieval_heads, self.config, self.dtype = args, list(retrieval_heads), config, dtype
        group = config.key_group if config.kv_bits < 16 else 1
        slots = max_tokens if retrieval_tokens is None else retrieval_tokens
        self.capacity = math.ceil(slots / group) * group  # retrieval slots (whole key groups)
        self.max_tokens = max_tokens
        self.layers = [self._layer(n_r) for n_r in self.retrieval_heads]

    def _layer(self, n_r: int) -> list[TensorSpec]:
        c, d, n = self.config, self.args.head_dim, self.capacity
        n_s = self.args.n_kv_heads - n_r
        specs = []
        if n_r and c.kv_bits == 16:
            specs += [TensorSpec(x, (n_r, n, d), self.dtype, "retrieval_kv") for x in ("k_data", "v_data")]
        elif n_r:
            width = d // 2 if c.kv_bits == 4 else d
            g = c.key_group
            specs += [
                TensorSpec(x, (n_r, n, width), torch.uint8, "retrieval_kv") for x in ("k_data", "v_data")
            ]
            specs += [TensorSpec(x, (n_r, g, d), self.dtype, "retrieval_kv") for x in ("k_tail", "v_tail")]
            specs += [TensorSpec(x, (n_r, n // g, d), SCALE_DTYPE, "scales") for x in ("k_scale", "k_zero")]
            specs += [TensorSpec(x, (n_r, n), SCALE_DTYPE, "scales") for x in ("v_scale", "v_zero")]
        if n_s:
            for name, size in (("sink", c.sink_tokens), ("ring", c.recent_tokens)):
                specs += [TensorSpec(f"{name}_{x}", (n_s, size, d), self.dtype, "streaming_kv") for x in "kv"]
        return specs

    def bytes_by_component(self) -> dict[str, int]:
        out = {"retrieval_kv": 0, "scales": 0, "streaming_kv": 0}
        for layer in self.layers:
            for t in layer:
                out[t.component] += t.nbytes
        return out

    @property
    def nbytes(self) -> int:
        return sum(self.bytes_by_component().values())

    def valid_len(self, name: str, seq_len: int) -> int:
        """Entries along axis 1 (tokens, groups or ring slots) of tensor ``name`` that hold state at ``seq_len``
        tokens: what a saved copy of the cache must keep."""
        c = self.config
        if name in ("sink_k", "sink_v"):
            return min(seq_len, c.sink_tokens)
        if name in ("ring_k", "ring_v"):  # slot of position p is (p - sink) % recent: filled from slot 0
            return min(max(seq_len - c.sink_tokens, 0), c.recent_tokens)
        if c.kv_bits == 16 and name in ("k_data", "v_data"):
            return seq_len
        whole = seq_len // c.key_group * c.key_group
        lengths = {"k_data": whole, "v_data": whole, "v_scale": whole, "v_zero": whole,
                   "k_scale": whole // c.key_group, "k_zero": whole // c.key_group,
                   "k_tail": seq_len - whole, "v_tail": seq_len - whole}  # fmt: skip
        if name not in lengths:
            raise ValueError(f"{name!r} is not a cache tensor")
        return lengths[name]

    def head_bytes(self, layer: int, context: int) -> tuple[int, int]:
        """Bytes one retrieval head and one streaming head of ``layer`` hold at ``context`` tokens: tensors along
        the token axis count for the tokens held, fixed ones (the fp tail of the key group being filled) count
        whole; each is split evenly over the layer's heads of its kind."""
        n_r = self.retrieval_heads[layer]
        n_s = self.args.n_kv_heads - n_r
        group = self.config.key_group
        retrieval = streaming = 0.0
        for t in self.layers[layer]:
            if t.component == "streaming_kv":
                size = t.shape[1]
                held = (
                    min(context, size)
                    if t.name.startswith("sink")
                    else min(max(context - self.config.sink_tokens, 0), size)
                )
                streaming += t.nbytes * held / size / n_s
            elif t.shape[1] == self.capacity:
                retrieval += t.nbytes * min(context, self.capacity) / self.capacity / n_r
            elif t.name.startswith("k_") and t.shape[1] == self.capacity // group:
                retrieval += t.nbytes * math.ceil(min(context, self.capacity) / group) / t.shape[1] / n_r
            else:
                retrieval += t.nbytes / n_r
        return int(retrieval), int(streaming)


class DuoKVCache:
    """The DuoAttention cache for one sequence. See the module docstring for the layout.

    ``prefix_attention`` attends over the quantized prefix; a benchmark or a check may hand in another
    implementation of the same contract (``kv_attention.PrefixAttention``)."""

    def __init__(
        self,
        spec: CacheSpec,
        device: torch.device | str,
        prefix_attention: PrefixAttention = kv_attention.quantized_prefix_attention,
    ):
        self.spec, self.config, self.args = spec, spec.config, spec.args
        self.prefix_attention = prefix_attention
        self.device = torch.device(device)
        self.n_retrieval = spec.retrieval_heads
        self.layers = [
            {t.name: torch.zeros(t.shape, dtype=t.dtype, device=self.device) for t in layer}
            for layer in spec.layers
        ]
        self.sm_scale = 1.0 / math.sqrt(self.args.head_dim)
        self.seq_len = 0
        self._saved: tuple | None = None

    @property
    def max_tokens(self) -> int:
        return self.spec.max_tokens

    @property
    def retrieval_len(self) -> int:
        """Tokens the retrieval heads hold here: all ``seq_len`` of them (a rank's share in a context-parallel
        cache, ``distributed.ShardedKVCache``)."""
        return self.seq_len

    def retrieval_len_at(self, seq_len: torch.Tensor) -> torch.Tensor:
        """``retrieval_len`` when ``seq_len`` (an int64 device tensor) tokens are held, computed on the device with
        no host sync: the decode graph's lengths."""
        return seq_len

    def reset(self) -> None:
        self.seq_len = 0
        self._saved = None

    def advance(self, n_tokens: int) -> None:
        self.seq_len += n_tokens

    def set_length(self, n_tokens: int) -> None:
        """Declare that the tensors hold the state of ``n_tokens`` tokens (written in by the library, or by a
        benchmark's synthetic fill)."""
        if not 0 <= n_tokens <= self.max_tokens:
            raise ValueError(
                f"a length of {n_tokens:,} tokens is outside this cache's 0..{self.max_tokens:,}"
            )
        self.seq_len = n_tokens

    def commit_tail_group(self) -> None:
        """Quantize every layer's fp tail, a group that has just filled (``retrieval_len`` a multiple of the key
        group), into the arena. The decode graph writes new tokens into the tail only and calls this on the host."""
        group, held = self.config.key_group, self.retrieval_len
        if self.config.kv_bits == 16 or held == 0 or held % group:
            raise ValueError(f"no full tail group to commit at {held:,} tokens (groups of {group})")
        for layer, n_r in zip(self.layers, self.n_retrieval, strict=True):
            if n_r:
                self._append_quantized(layer, layer["k_tail"], layer["v_tail"], held - group)

    def arena(self, layer: int, n_quant: int | torch.Tensor | None = None) -> QuantArena:
        """The quantized arena of ``layer``'s retrieval heads, holding ``n_quant`` tokens (default: every whole
        key group of the held tokens; an int32 [1] device tensor for the decode graph)."""
        group = self.config.key_group
        if self.config.kv_bits == 16 or not self.n_retrieval[layer]:
            raise ValueError(f"layer {layer} has no quantized retrieval heads")
        s = self.layers[layer]
        return QuantArena(
            s["k_data"], s["k_scale"], s["k_zero"], s["v_data"], s["v_scale"], s["v_zero"],
            self.retrieval_len // group * group if n_quant is None else n_quant, self.config.kv_bits, group,
        )  # fmt: skip

    def step_layer(self, layer: int, n_quant: torch.Tensor) -> StepLayer:
        """``layer``'s tensors for the graph-safe decode step (``kernels.decode_step``), with the quantized length
        ``n_quant`` on the device."""
        s, n_r = self.layers[layer], self.n_retrieval[layer]
        has_streaming = n_r < self.args.n_kv_heads
        return StepLayer(
            self.arena(layer, n_quant) if n_r else None,
            (s["k_tail"], s["v_tail"]) if n_r else None,
            (s["sink_k"], s["sink_v"]) if has_streaming else None,
            (s["ring_k"], s["ring_v"]) if has_streaming else None,
        )

    def step_output(self, layer: int, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """The graph-safe decode step's attention output of ``layer`` from its ``out`` [1, Hq, D] and ``lse``
        [1, Hq] over the tokens held here: ``out`` itself (a context-parallel cache merges its retrieval heads'
        over the ranks)."""
        return out

    def check_room(self, n_tokens: int) -> None:
        if self.seq_len + n_tokens > self.max_tokens:
            raise CacheFullError(
                f"the cache holds {self.max_tokens:,} tokens; {self.seq_len:,} are used and {n_tokens:,} more "
                f"were asked for"
            )

    # ---- attention -------------------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q [T, Hq, D] over the held tokens + the new ones (causal), then store the new k, v."""
        self.check_room(q.shape[0])
        return split_heads(self.n_retrieval[layer], layer, q, k, v, self._retrieval, self._streaming)

    def _retrieval(self, layer: int, q, k, v) -> torch.Tensor:
        s, bits = self.layers[layer], self.config.kv_bits
        pos = self.seq_len
        if bits == 16:  # write first, then attend in place: no copy of the prefix
            end = pos + k.shape[1]
            s["k_data"][:, pos:end] = k
            s["v_data"][:, pos:end] = v
            out, _ = dense_attention(
                q, s["k_data"][:, :end], s["v_data"][:, :end], n_ctx=pos, sm_scale=self.sm_scale
            )
            return out
        group = self.config.key_group
        n_quant, tail_len = (pos // group) * group, pos % group
        k_fp, v_fp = self._fp_run(s, k, v, tail_len)
        out, lse = dense_attention(q, k_fp, v_fp, n_ctx=tail_len, sm_scale=self.sm_scale)
        out, lse = self._with_prefix(layer, q, out, lse, n_quant)
        self._append_quantized(s, k_fp, v_fp, n_quant)
        return out

    @staticmethod
    def _fp_run(
        s: dict, k: torch.Tensor, v: torch.Tensor, tail_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp tail's ``tail_len`` tokens followed by ``k, v``: what attends unquantized, and what
        ``_append_quantized`` takes."""
        k_fp = torch.cat([s["k_tail"][:, :tail_len], k], dim=1)
        v_fp = torch.cat([s["v_tail"][:, :tail_len], v], dim=1)
        return k_fp, v_fp

    def _with_prefix(self, layer: int, q, out, lse, n_quant: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) merged with the attention over the first ``n_quant`` quantized tokens (if any)."""
        if not n_quant:
            return out, lse
        out_q, lse_q = self.prefix_attention(q, self.arena(layer, n_quant), self.sm_scale)
        return merge(out_q, lse_q, out, lse)

    def _append_quantized(self, s: dict, k_fp: torch.Tensor, v_fp: torch.Tensor, n_quant: int) -> None:
        """Quantize the whole groups among (old tail + new tokens) into the arena; keep the rest as the tail."""
        group, bits = self.config.key_group, self.config.kv_bits
        full = (k_fp.shape[1] // group) * group
        if full:
            kd, ks, kz, vd, vs, vz = kv_quantize.quantize_kv(k_fp[:, :full], v_fp[:, :full], bits, group)
            g0, g1 = n_quant // group, (n_quant + full) // group
            s["k_data"][:, n_quant : n_quant + full] = kd
            s["v_data"][:, n_quant : n_quant + full] = vd
            s["k_scale"][:, g0:g1], s["k_zero"][:, g0:g1] = ks, kz
            s["v_scale"][:, n_quant : n_quant + full], s["v_zero"][:, n_quant : n_quant + full] = vs, vz
        rest = k_fp.shape[1] - full
        s["k_tail"][:, :rest] = k_fp[:, full:]
        s["v_tail"][:, :rest] = v_fp[:, full:]

    def _streaming(self, layer: int, q, k, v) -> torch.Tensor:
        s, c = self.layers[layer], self.config
        pos = self.seq_len
        n_sink = min(pos, c.sink_tokens)
        n_ring = min(max(pos - c.sink_tokens, 0), c.recent_tokens)
        k_all = torch.cat([s["sink_k"][:, :n_sink], s["ring_k"][:, :n_ring], k], dim=1)
        v_all = torch.cat([s["sink_v"][:, :n_sink], s["ring_v"][:, :n_ring], v], dim=1)
        out, _ = dense_attention(q, k_all, v_all, n_ctx=n_sink + n_ring, sm_scale=self.sm_scale)
        self._store_streaming(s, k, v, pos)
        return out

    def _store_streaming(self, s: dict, k: torch.Tensor, v: torch.Tensor, pos: int) -> None:
        """Positions below sink_tokens become sinks; of the rest only the last recent_tokens survive, in ring slot
        (p - sink) % recent. Both are contiguous position ranges, so plain slices do it (no device sync)."""
        c, t = self.config, k.shape[1]
        sink_end = min(pos + t, c.sink_tokens)
        if pos < sink_end:
            s["sink_k"][:, pos:sink_end] = k[:, : sink_end - pos]
            s["sink_v"][:, pos:sink_end] = v[:, : sink_end - pos]
        first = max(pos, c.sink_tokens, pos + t - c.recent_tokens)  # first position that stays in the ring
        while first < pos + t:
            slot = (first - c.sink_tokens) % c.recent_tokens
            n = min(pos + t - first, c.recent_tokens - slot)  # up to the ring's end, then wrap
            s["ring_k"][:, slot : slot + n] = k[:, first - pos : first - pos + n]
            s["ring_v"][:, slot : slot + n] = v[:, first - pos : first - pos + n]
            first += n

    def retrieval_keys(self, layer: int, start: int, end: int) -> torch.Tensor:
        """Keys (after RoPE) of ``layer``'s retrieval heads at positions ``[start, end)`` of the tokens held, as
        the attention reads them (de-quantized), in float32: [n_retrieval, end - start, head_dim]. Read-only, and
        for analyses after an answer (``duo_qserve.evidence``), not for the decode path."""
        if not 0 <= start <= end <= self.seq_len:
            raise ValueError(f"positions {start:,}..{end:,} are outside the {self.seq_len:,} tokens held")
        s, c = self.layers[layer], self.config
        if c.kv_bits == 16:
            return s["k_data"][:, start:end].float()
        group = c.key_group
        n_quant = self.seq_len // group * group
        if start == end:
            return s["k_tail"][:, :0].float()
        parts = []
        if start < n_quant:
            g0, g1 = start // group, math.ceil(min(end, n_quant) / group)
            keys = dequantize_keys(
                s["k_data"][:, g0 * group : g1 * group], s["k_scale"][:, g0:g1], s["k_zero"][:, g0:g1],
                c.kv_bits, group,
            )  # fmt: skip
            parts.append(keys[:, start - g0 * group : min(end, n_quant) - g0 * group])
        if end > n_quant:
            parts.append(s["k_tail"][:, max(start, n_quant) - n_quant : end - n_quant].float())
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    # ---- checkpoint / restore --------------------------------------------------------------------------------
    _SMALL = ("k_tail", "v_tail", "sink_k", "sink_v", "ring_k", "ring_v")

    def checkpoint(self) -> None:
        """Remember the state at the end of the document. Whole quantized groups are never rewritten below
        ``seq_len``, so only the fp tails, sinks and rings (a few MB) are copied."""
        small = [{n: t.clone() for n, t in layer.items() if n in self._SMALL} for layer in self.layers]
        self._saved = (self.seq_len, small)

    def restore(self) -> None:
        if self._saved is None:
            raise RuntimeError("no checkpoint to restore: ingest a document first")
        self.seq_len, small = self._saved
        for layer, saved in zip(self.layers, small, strict=True):
            for name, t in saved.items():
                layer[name].copy_(t)


class FullKVCache(DuoKVCache):
    """Plain full attention: every head a retrieval head kept in the model's dtype (the reference the DuoAttention
    cache is tested against, and the cache for calibration runs)."""

    def __init__(self, args: ModelArgs, max_tokens: int, device: torch.device | str, dtype: torch.dtype):
        spec = CacheSpec(args, [args.n_kv_heads] * args.n_layers, CacheConfig(kv_bits=16), max_tokens, dtype)
        super().__init__(spec, device)


class CacheFullError(RuntimeError):
    """The sequence would exceed the preallocated cache."""
