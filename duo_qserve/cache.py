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
from duo_qserve.kernels.attention import dense_attention, merge
from duo_qserve.model import ModelArgs
from duo_qserve.quant.kv_quant import SCALE_DTYPE


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
    """Every tensor the cache allocates, per layer, for a capacity of ``max_tokens``."""

    def __init__(
        self,
        args: ModelArgs,
        retrieval_heads: list[int],
        config: CacheConfig,
        max_tokens: int,
        dtype: torch.dtype,
    ):
        if len(retrieval_heads) != args.n_layers:
            raise ValueError(
                f"need one retrieval-head count per layer ({args.n_layers}), got {len(retrieval_heads)}"
            )
        self.args, self.retrieval_heads, self.config, self.dtype = args, list(retrieval_heads), config, dtype
        group = config.key_group if config.kv_bits < 16 else 1
        self.capacity = math.ceil(max_tokens / group) * group  # retrieval slots (whole key groups)
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


def split_heads(n_retrieval: int, layer: int, q, k, v, retrieval, streaming) -> torch.Tensor:
    """Send KV heads ``[0, n_retrieval)`` (and their query heads) to ``retrieval``, the rest to ``streaming``:
    head reordering made both contiguous ranges. k/v arrive [T, Hkv, D] and leave [Hkv, T, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    parts = []
    if n_retrieval:
        parts.append(retrieval(layer, q[:, : n_retrieval * g], k[:n_retrieval], v[:n_retrieval]))
    if n_retrieval < k.shape[0]:
        parts.append(streaming(layer, q[:, n_retrieval * g :], k[n_retrieval:], v[n_retrieval:]))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class DuoKVCache:
    """The DuoAttention cache for one sequence. See the module docstring for the layout."""

    def __init__(self, spec: CacheSpec, device: torch.device | str):
        self.spec, self.config, self.args = spec, spec.config, spec.args
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

    def reset(self) -> None:
        self.seq_len = 0
        self._saved = None

    def advance(self, n_tokens: int) -> None:
        self.seq_len += n_tokens

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
        k_fp = torch.cat([s["k_tail"][:, :tail_len], k], dim=1)
        v_fp = torch.cat([s["v_tail"][:, :tail_len], v], dim=1)
        out, lse = dense_attention(q, k_fp, v_fp, n_ctx=tail_len, sm_scale=self.sm_scale)
        if n_quant:
            out_q, lse_q = kv_attention.quantized_prefix_attention(
                q, s["k_data"], s["k_scale"], s["k_zero"], s["v_data"], s["v_scale"], s["v_zero"],
                n_quant, bits, group, self.sm_scale,
            )  # fmt: skip
            out, lse = merge(out_q, lse_q, out, lse)
        self._append_quantized(s, k_fp, v_fp, n_quant)
        return out

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
