"""Attention of one decode token over one layer of the DuoAttention cache, with device lengths (CUDA graphs).

Inputs are the layer's un-rotated ``q`` [1, Hq, D] and ``k``/``v`` [1, Hkv, D], the RoPE tables of the token's
position, the layer's cache tensors (``StepLayer``, built by the cache) and device scalars: ``StepSlots`` (the fp
tail slots held before the new token, whether this cache keeps it, the ring slot it overwrites) and the arena's
``n_quant`` (quantized prefix length). The step rotates q and k, writes the new k/v into the cache, and returns the
attention output [1, Hq, D] with its log-sum-exp [1, Hq]:

- retrieval kv heads ``[0, n_retrieval)``: the quantized prefix ``[0, n_quant)`` + the fp tail slots
  ``[0, tail)``, and the new token, written at slot ``tail``, where ``keep`` is 1. A rank of a context-parallel
  cache holds only some of the tokens (``duo_qserve.distributed``): the rank that owns the new token keeps it,
  the others attend their own tokens only and leave their tail as it is, so the token is counted once when the
  ranks' partials are merged;
- streaming kv heads: every sink and ring slot + the new token, which then replaces ring slot ``ring`` (the
  ring is full: the token leaving the window is still attended this step, as in ``DuoKVCache._streaming``).

``reference`` does it with torch ops (CPU); on CUDA three launches replace the ~40 small kernels per layer that a
launch-bound batch-1 step would otherwise pay for:

1. ``_step_kernel``, one program per (kv head, chunk of ``BLOCK_N`` slots): RoPE of q and k, the chunk's slots of
   the tail or of sink + ring + new token for all G query heads of the kv head at once (two fp32 dots), one
   normalized partial (out, lse) per query head; it stores the rotated q for step 2 and the new k/v
   (the program whose chunk read the overwritten ring slot writes it, after a barrier, so nothing reads it late);
2. the split-K code kernel over the quantized prefix (``kv_attention.code_partials``), into the same buffer;
3. the split merge (``kv_attention.merge_partials``) straight into the [1, Hq, D] output and its lse.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from duo_qserve.kernels import INTERPRETED, kv_attention, use_triton
from duo_qserve.kernels.attention import apply_rope, dense_attention, merge, split_heads
from duo_qserve.kernels.kv_attention import QuantArena
from duo_qserve.kernels.kv_quantize import backend
from duo_qserve.quant.kv_quant import dequantize_keys, dequantize_values

BLOCK_N = 32  # cache slots per step-kernel program


class StepLayer(NamedTuple):
    """One layer's cache tensors as the step reads and writes them; None for a kind of head the layer lacks.
    Retrieval heads are KV heads ``[0, n_retrieval)``, the rest streaming heads."""

    arena: QuantArena | None  # the retrieval heads' codes, ``n_quant`` an int32 [1] device tensor
    tail: tuple[torch.Tensor, torch.Tensor] | None  # the retrieval heads' fp k, v [n_retrieval, group, D]
    sink: tuple[torch.Tensor, torch.Tensor] | None  # the streaming heads' sinks k, v [n_streaming, sink, D]
    ring: tuple[torch.Tensor, torch.Tensor] | None  # and their rings k, v [n_streaming, recent, D]

    @property
    def n_retrieval(self) -> int:
        return 0 if self.arena is None else self.arena.k_data.shape[0]


class StepSlots(NamedTuple):
    """Where the new token goes, as int64 [1] tensors on q's device (a CUDA graph reads them at each replay); the
    same for every layer of a step."""

    tail: torch.Tensor  # the retrieval heads' fp-tail slots held before it: it goes into slot ``tail``
    keep: torch.Tensor  # 1: the retrieval heads here attend and store it; 0: another rank's cache holds it
    ring: torch.Tensor  # the streaming ring slot it overwrites


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], s: StepLayer,
    slots: StepSlots, sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The step over layer ``s``: the fused kernels where Triton runs, else ``reference``. Returns (out [1, Hq, D]
    in q's dtype, lse [1, Hq] float32; -inf for a head that attended nothing)."""
    path = fused if use_triton(backend(), q, INTERPRETED) else reference
    return path(q, k, v, rope, s, slots, sm_scale)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query q [1, Hq, D] over the first ``n_valid`` (a device scalar) of the slots k/v [Hkv, S, D].
    Returns (out [1, Hq, D] in q's dtype, lse [1, Hq] float32) like ``dense_attention``; with no valid slot,
    zeros and lse = -inf (no mass in ``merge``)."""
    hq, d = q.shape[1:]
    hkv, n, _ = k.shape
    qf = q.reshape(hkv, hq // hkv, d).float()
    scores = torch.matmul(qf, k.float().transpose(1, 2)) * sm_scale  # [Hkv, G, S]
    keep = torch.arange(n, device=q.device) < n_valid
    scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    shift = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.matmul(torch.exp(scores - shift[..., None]), v.float())  # [Hkv, G, D]
    return out.reshape(1, hq, d).to(q.dtype), lse.reshape(1, hq)


def reference(
    q, k, v, rope, s: StepLayer, slots: StepSlots, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` in torch ops: the whole arena de-quantized and masked, the tail masked, the ring concatenated."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)

    def retrieval(_, q, k, v):
        a, (k_tail, v_tail) = s.arena, s.tail
        keep = slots.keep.bool()
        for tail, new in ((k_tail, k), (v_tail, v)):  # the new token, or the slot as it was where not kept
            tail.index_copy_(1, slots.tail, torch.where(keep, new, tail.index_select(1, slots.tail)))
        out, lse = masked_attention(q, k_tail, v_tail, slots.tail + slots.keep, sm_scale)
        k_q = dequantize_keys(a.k_data, a.k_scale, a.k_zero, a.bits, a.group)
        v_q = dequantize_values(a.v_data, a.v_scale, a.v_zero, a.bits)
        out_q, lse_q = masked_attention(q, k_q, v_q, a.n_quant, sm_scale)
        return merge(out_q, lse_q, out, lse)

    def streaming(_, q, k, v):
        (sink_k, sink_v), (ring_k, ring_v) = s.sink, s.ring
        k_all = torch.cat([sink_k, ring_k, k], dim=1)
        v_all = torch.cat([sink_v, ring_v, v], dim=1)
        out, lse = dense_attention(q, k_all, v_all, n_ctx=k_all.shape[1], sm_scale=sm_scale)
        ring_k.index_copy_(1, slots.ring, k)
        ring_v.index_copy_(1, slots.ring, v)
        return out, lse

    return split_heads(s.n_retrieval, 0, q, k, v, retrieval, streaming)


@triton.jit
def _rope(ptr, d, cos, sin, HALF: tl.constexpr):
    """Rotate-half RoPE (``attention.apply_rope``) of the vectors at ``ptr`` (a pointer or a column of pointers, one
    per vector), fp32: channel d pairs with d +- D/2."""
    x = tl.load(ptr + d).to(tl.float32)
    partner = tl.load(ptr + (d + HALF) % (2 * HALF)).to(tl.float32)
    return x * cos + tl.where(d < HALF, -partner, partner) * sin


@triton.jit
def _step_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qr_ptr,
    kt_ptr, vt_ptr, tail_ptr, keep_ptr, sk_ptr, sv_ptr, rk_ptr, rv_ptr, ring_ptr, po_ptr, plse_ptr,
    n_retrieval, part0, n_parts, qk_scale, s_qh, s_kh, s_vh,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, SINK: tl.constexpr,
    RECENT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (kv head h, chunk c): slots ``c * BLOCK_N + [0, BLOCK_N)`` of head h's fp context, numbered
    tail ``[0, tail)`` then the new token at ``tail`` where kept (retrieval head), or sinks, ring, then the new
    token at ``SINK + RECENT`` (streaming head). The G query heads of h are the rows of one [G_PAD, D] tile (rows past
    G repeat the last), so scores and outputs are two dots. Partial of query head h * G + g goes to part
    ``part0 + c``."""
    h, c = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, D)
    cos = tl.load(cos_ptr + d % HALF)
    sin = tl.load(sin_ptr + d % HALF)
    dtype = k_ptr.dtype.element_ty  # q and k are rounded to it after RoPE, as in the eager path
    # The dots: fp32 caches as exact fp32 products; fp16/bf16 ones on the tensor cores in fp16 (q and k as they are
    # within fp16's range, p rounded to 11 bits): this kernel is latency-bound, and the tensor cores halve its time.
    DOT: tl.constexpr = tl.float32 if dtype == tl.float32 else tl.float16
    PREC: tl.constexpr = "ieee" if dtype == tl.float32 else "tf32"
    k_new = _rope(k_ptr + h * s_kh, d, cos, sin, HALF).to(dtype)
    v_new = tl.load(v_ptr + h * s_vh + d)

    is_r = h < n_retrieval
    hs = h - n_retrieval  # index among the streaming heads
    n = c * BLOCK_N + tl.arange(0, BLOCK_N)
    # Where each slot's k/v comes from depends only on the head and the slot, so these loads go out at once; the
    # device lengths (which tail slots hold tokens, which slot is new) only select among what they bring.
    in_tail = (n < tl.where(is_r, GROUP, 0))[:, None]
    in_sink = (n < tl.where(is_r, 0, SINK))[:, None]
    in_ring = ((n >= SINK) & (n < tl.where(is_r, 0, SINK + RECENT)))[:, None]
    tail_off = (h * GROUP + n)[:, None] * D + d[None, :]
    sink_off = (hs * SINK + n)[:, None] * D + d[None, :]
    ring_off = (hs * RECENT + n - SINK)[:, None] * D + d[None, :]
    kk = tl.load(kt_ptr + tail_off, mask=in_tail, other=0.0)
    kk = tl.where(in_sink, tl.load(sk_ptr + sink_off, mask=in_sink, other=0.0), kk)
    kk = tl.where(in_ring, tl.load(rk_ptr + ring_off, mask=in_ring, other=0.0), kk)
    vv = tl.load(vt_ptr + tail_off, mask=in_tail, other=0.0)
    vv = tl.where(in_sink, tl.load(sv_ptr + sink_off, mask=in_sink, other=0.0), vv)
    vv = tl.where(in_ring, tl.load(rv_ptr + ring_off, mask=in_ring, other=0.0), vv)

    tail = tl.load(tail_ptr).to(tl.int32)
    keep = tl.load(keep_ptr).to(tl.int32)
    ring = tl.load(ring_ptr).to(tl.int32)
    new = tl.where(is_r, tail, SINK + RECENT)  # the new token's slot; the slots before it come from memory
    is_new = (n == new)[:, None]
    held = (n < new)[:, None]  # tail slots past the new token hold nothing of this group: zeros, masked below
    kk = tl.where(is_new, k_new[None, :], tl.where(held, kk, 0.0)).to(DOT)
    vv = tl.where(is_new, v_new[None, :], tl.where(held, vv, 0.0)).to(DOT)
    valid = (n < new + tl.where(is_r, keep, 1))[None, :]  # a retrieval head attends the new token where kept

    gi = tl.arange(0, G_PAD)
    row_ok = gi < G
    hq = h * G + tl.minimum(gi, G - 1)
    qg = _rope(q_ptr + hq[:, None] * s_qh, d[None, :], cos[None, :], sin[None, :], HALF).to(dtype)
    if c == 0:
        tl.store(qr_ptr + hq[:, None] * D + d[None, :], qg, mask=row_ok[:, None])
    scores = tl.dot(qg.to(DOT), tl.trans(kk), input_precision=PREC) * qk_scale  # [G_PAD, BLOCK_N]
    scores = tl.where(valid, scores, float("-inf"))
    m = tl.max(scores, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # a chunk past the context: zeros, lse = -inf
    p = tl.exp2(scores - m[:, None])
    l_sum = tl.sum(p, 1)
    out = tl.dot(p.to(DOT), vv, input_precision=PREC) * tl.where(l_sum > 0, 1.0 / l_sum, 0.0)[:, None]
    part = (h * n_parts + part0 + c) * G + gi
    tl.store(po_ptr + part[:, None] * D + d[None, :], out, mask=row_ok[:, None])
    tl.store(plse_ptr + part, (m + tl.log2(l_sum)) * 0.6931471805599453, mask=row_ok)

    # The new k/v: the program whose chunk holds the destination slot writes it once all its threads have read
    # the chunk (the ring slot's old token was attended above); no other program reads that slot.
    tl.debug_barrier()
    if is_r:
        if (keep != 0) & (c == tail // BLOCK_N):
            tl.store(kt_ptr + (h * GROUP + tail) * D + d, k_new)
            tl.store(vt_ptr + (h * GROUP + tail) * D + d, v_new)
    elif c == (SINK + ring) // BLOCK_N:
        tl.store(rk_ptr + (hs * RECENT + ring) * D + d, k_new)
        tl.store(rv_ptr + (hs * RECENT + ring) * D + d, v_new)


def fused(
    q, k, v, rope, s: StepLayer, slots: StepSlots, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` in three launches (module docstring). Chunk and split counts depend only on the cache's
    shapes, so the launches are the same for every position."""
    _, hq, d = q.shape
    hkv = k.shape[1]
    g, n_r = hq // hkv, s.n_retrieval
    n_s = hkv - n_r
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("q, k, v need contiguous head vectors")
    unused = q  # the pointer passed for absent tensors (no retrieval heads, no streaming heads, no sinks)
    tails = s.tail if n_r else (unused, unused)
    sink = s.sink[0].shape[1] if n_s else 0
    recent = s.ring[0].shape[1] if n_s else 1
    sinks = s.sink if sink else (unused, unused)
    rings = s.ring if n_s else (unused, unused)
    group = s.arena.group if n_r else 1
    n_chunks = triton.cdiv(max(group, sink + recent + 1 if n_s else 0), BLOCK_N)
    code_splits = 0
    if n_r:  # code splits + chunks in one merge tile, as for the prefix alone
        max_splits = kv_attention.MAX_SPLITS - n_chunks
        code_splits = kv_attention.decode_splits(q[:, : n_r * g], s.arena, max_splits=max_splits)
    n_parts = code_splits + n_chunks
    po = torch.empty((hkv, n_parts, g, d), dtype=torch.float32, device=q.device)
    plse = torch.empty((hkv, n_parts, g), dtype=torch.float32, device=q.device)
    q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cos, sin = rope
    _step_kernel[(hkv, n_chunks)](
        q, k, v, cos, sin, q_rot, *tails, slots.tail, slots.keep, *sinks, *rings, slots.ring, po, plse,
        n_r, code_splits, n_parts, sm_scale * kv_attention.LOG2E, q.stride(1), k.stride(1), v.stride(1),
        G=g, G_PAD=max(16, triton.next_power_of_2(g)), D=d, GROUP=group, SINK=sink, RECENT=recent,
        BLOCK_N=BLOCK_N, num_warps=4,
    )  # fmt: skip
    if n_r:
        kv_attention.code_partials(q_rot[:, : n_r * g], s.arena, sm_scale, po, plse, code_splits)
    out = torch.empty_like(q)
    lse = torch.empty((1, hq), dtype=torch.float32, device=q.device)
    kv_attention.merge_partials(po, plse, out, lse, code_splits, n_r)
    return out, lse
