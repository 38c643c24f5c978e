"""Capacity planning: how many tokens fit in a memory budget, and how many bytes N tokens take.

The KV-cache figures come from ``CacheSpec`` (the same tensor list the cache allocates), so they are exact.
With context parallelism over ``world_size`` ranks (``duo_qserve.distributed``) a plan is per rank: each holds
the weights, the streaming heads and its share of the retrieval tokens, and the budget is one device's memory.
Weights are exact for a given shape and precision. Workspace is an estimate of the activations of one pre-fill
chunk plus a fixed runtime reserve; the engine reports the measured peak beside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from duo_qserve.cache import CacheConfig
from duo_qserve.distributed import TokenShards
from duo_qserve.kernels.kv_attention import SLAB_BYTES
from duo_qserve.model import ModelArgs

RUNTIME_RESERVE = 1 << 30  # CUDA context, allocator fragmentation, kernels' small buffers


def parse_bytes(text: str | int | float) -> int:
    """'80GB' = 80e9 bytes, '79.6GiB' = 79.6 * 2**30, '512MB', or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}: write e.g. 80GB, 79.6GiB or 512MB")
    unit = (m.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


def weight_bytes(args: ModelArgs, w8a8: bool, dtype_bytes: int = 2) -> int:
    """Linear layers int8 + fp32 per-channel scales (W8A8) or dtype; embeddings, norms and lm_head in dtype."""
    d, kv = args.dim, args.n_kv_heads * args.head_dim
    q = args.n_heads * args.head_dim
    inter = args.intermediate_size
    linear_shapes = [(q, d), (kv, d), (kv, d), (d, q), (inter, d), (inter, d), (d, inter)]
    per_layer = sum(n * (k + 4) if w8a8 else n * k * dtype_bytes for n, k in linear_shapes)
    per_layer += 2 * d * dtype_bytes  # the two RMSNorm weights
    embed = args.vocab_size * d * dtype_bytes
    head = 0 if args.tie_word_embeddings else embed
    return args.n_layers * per_layer + embed + head + d * dtype_bytes


def workspace_bytes(args: ModelArgs, chunk_size: int, dtype_bytes: int = 2, merge_ranks: int = 0) -> int:
    """Peak activations of one pre-fill chunk (hidden states, q/k/v, MLP intermediates and their int8 copies,
    flash-attention inputs with K/V repeated per query head, and a bounded slab of de-quantized prefix) plus the
    runtime reserve. Scores are never materialized on the GPU paths. With context parallelism over
    ``merge_ranks`` ranks a layer also gathers every rank's partial attention (float32 out + lse per query head)
    beside its own packed copy (``distributed.ContextGroup.merge``)."""
    t, hd = chunk_size, args.head_dim
    merge = (merge_ranks + 1) * t * args.n_heads * (hd + 1) * 4 if merge_ranks else 0
    qkv = (args.n_heads + 2 * args.n_kv_heads) * hd
    per_token = dtype_bytes * (4 * args.dim + qkv + args.n_heads * hd + 3 * args.intermediate_size)
    per_token += args.intermediate_size + args.dim + 8  # int8 activations + per-token scales
    per_token += dtype_bytes * 3 * args.n_heads * hd  # repeated K/V + output of the flash call
    return t * per_token + SLAB_BYTES + args.vocab_size * 4 + merge + RUNTIME_RESERVE


@dataclass
class MemoryPlan:
    tokens: int  # of the document's context, over every rank
    components: dict[str, int]  # one rank's bytes: weights, retrieval_kv, scales, streaming_kv, workspace
    world_size: int = 1
    tokens_per_rank: int = 0  # the retrieval tokens the fullest rank holds (``tokens`` at world size 1)

    @property
    def total(self) -> int:
        """One rank's bytes (what must fit in one device's budget)."""
        return sum(self.components.values())

    @property
    def total_all_ranks(self) -> int:
        """Every rank allocates the same tensors, so the whole group holds ``world_size`` times ``total``."""
        return self.total * self.world_size


def plan_for_tokens(
    args: ModelArgs,
    retrieval_heads: list[int],
    config: CacheConfig,
    n_tokens: int,
    *,
    w8a8: bool,
    chunk_size: int,
    dtype: torch.dtype = torch.float16,
    include_fixed: bool = True,
    world_size: int = 1,
) -> MemoryPlan:
    """One rank's bytes for ``n_tokens`` over ``world_size`` ranks; ``include_fixed=False`` counts the cache alone
    (weights already resident)."""
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    shards = TokenShards(world_size, config.key_group)
    spec = shards.rank_spec(args, retrieval_heads, config, n_tokens, dtype)
    comps = dict(spec.bytes_by_component())
    if include_fixed:
        comps["weights"] = weight_bytes(args, w8a8, dtype_bytes)
        comps["workspace"] = workspace_bytes(
            args, chunk_size, dtype_bytes, world_size if world_size > 1 else 0
        )
    return MemoryPlan(n_tokens, comps, world_size, shards.held(n_tokens, 0))


def max_tokens_for_budget(
    args: ModelArgs,
    retrieval_heads: list[int],
    config: CacheConfig,
    budget: int,
    *,
    w8a8: bool,
    chunk_size: int,
    dtype: torch.dtype = torch.float16,
    include_fixed: bool = True,
    world_size: int = 1,
) -> MemoryPlan:
    """The largest token count whose whole plan fits in ``budget`` bytes on each of ``world_size`` ranks (0 tokens
    if not even the weights do)."""

    def plan(n: int) -> MemoryPlan:
        return plan_for_tokens(
            args, retrieval_heads, config, n, w8a8=w8a8, chunk_size=chunk_size, dtype=dtype,
            include_fixed=include_fixed, world_size=world_size,
        )  # fmt: skip

    def fits(n: int) -> bool:
        return plan(n).total <= budget

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1 << 36:
            break
    while hi - lo > 1:  # the plan grows monotonically with tokens
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return plan(lo)
