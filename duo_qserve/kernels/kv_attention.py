"""Attention of new queries over the quantized part of the retrieval-head cache.

The retrieval cache of one layer holds ``n_quant`` tokens (a multiple of the key group) as packed 4-bit or 8-bit
codes (layout in ``duo_qserve.quant.kv_quant``); every new query sees all of them. The result carries its
log-sum-exp so the cache can merge it with attention over the fp tail and the new tokens.

``reference`` de-quantizes everything and is the oracle. On CUDA (or on CPU with ``DUO_QSERVE_TRITON=1`` under
``TRITON_INTERPRET=1``) two paths read the codes instead:

- decode (``T <= DECODE_MAX_T``): ``_attn_codes_kernel``, a split-K flash-decoding kernel. One program per
  (kv head, split of the tokens) holds all ``T * G`` query rows of that kv head (GQA: the codes are read once).
  It never de-quantizes a tile: within one key group the key scale/zero are per channel, so
  ``q . k = (q * s_k) . codes + q . z_k``; value scale/zero are per token, so
  ``p @ v = (p * s_v) @ codes + (p . z_v)``. Codes enter the dots as the fp16 numbers 1024 + RAW * c that a bit
  trick makes of them (``_raw``); 1/RAW rides on the other operand, and the 1024's share, 1024 * sum(operand),
  comes off exactly: through the keys' per-row bias, and from each block's value sums before they join the
  running sums in fp32. The codes arrive through tensor descriptors (TMA), and every dot is transposed so that the
  few query rows are its N (padded to 8) rather than its M (padded to 16): the key dots' M is a block's tokens, the
  value dots' M the channels: the kernel is bound by instruction issue, and both cut the instructions and
  registers per block. A second tiny kernel merges the splits by their log-sum-exp.
- pre-fill: slabs of the prefix are de-quantized into one bounded fp16 buffer (``_dequant_kernel``) and go
  through the fused flash/cuDNN attention with log-sum-exp, merged across slabs: at pre-fill query counts the
  de-quantization is small beside the attention, so this runs at the library kernel's FLOP rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from duo_qserve.kernels import INTERPRETED, use_triton
from duo_qserve.kernels.attention import dense_attention, fused_attention, merge
from duo_qserve.kernels.kv_quantize import backend
from duo_qserve.quant.kv_quant import dequantize_keys, dequantize_values, qmax

# Splits of the split-K code kernel, all held in one tile by the merge: enough that a layer with a single retrieval
# head still gets 7-8 programs per SM (132 SMs on an H100/H200).
MAX_SPLITS = 1024
DECODE_MAX_T = 16  # queries per call that go through the split-K code kernel; more go through the slab path
SLAB_BYTES = 256 << 20  # bound on the pre-fill path's fp K+V buffer
LOG2E = 1.4426950408889634


class QuantArena(NamedTuple):
    """One layer's quantized retrieval-head KV as the kernels read it: tokens ``[0, n_quant)`` of a capacity of N
    (whole key groups) held as codes (layout in ``duo_qserve.quant.kv_quant``). The cache builds it; every kernel
    takes this one value instead of the six tensors and their lengths. A NamedTuple, immutable and cheap to
    build: the eager cache builds one per layer and forward.

    ``n_quant`` is a host int, or an int32 [1] device tensor (CUDA graphs: one launch serves every length)."""

    k_data: torch.Tensor  # [Hkv, N, D * bits / 8] uint8
    k_scale: torch.Tensor  # [Hkv, N / group, D], per channel over each key group
    k_zero: torch.Tensor
    v_data: torch.Tensor  # [Hkv, N, D * bits / 8] uint8
    v_scale: torch.Tensor  # [Hkv, N], per token
    v_zero: torch.Tensor
    n_quant: int | torch.Tensor
    bits: int
    group: int

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(k_data, k_scale, k_zero, v_data, v_scale, v_zero): the kernels' pointer arguments, in that order."""
        return self[:6]

    @property
    def on_device(self) -> bool:
        """Whether ``n_quant`` is read on the device (the grid is then sized for the whole capacity)."""
        return isinstance(self.n_quant, torch.Tensor)


PrefixAttention = Callable[[torch.Tensor, QuantArena, float], tuple[torch.Tensor, torch.Tensor]]
"""Attention of q [T, Hq, D] over an arena's tokens -> (out [T, Hq, D], lse [T, Hq] float32): the signature of
``quantized_prefix_attention``, ``reference`` and any stand-in a benchmark hands the cache."""


def reference(q: torch.Tensor, arena: QuantArena, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D] over the arena's tokens ``[0, n_quant)`` (a host length), de-quantized in full: the oracle.
    Returns (out [T, Hq, D], lse [T, Hq])."""
    a, n = arena, arena.n_quant
    ng = n // a.group
    k = dequantize_keys(a.k_data[:, :n], a.k_scale[:, :ng], a.k_zero[:, :ng], a.bits, a.group)
    v = dequantize_values(a.v_data[:, :n], a.v_scale[:, :n], a.v_zero[:, :n], a.bits)
    return dense_attention(q, k, v, n_ctx=n, sm_scale=sm_scale)


# ---------------------------------------------------------------------------------------------------- decode


@triton.jit
def _raw(w, SUB: tl.constexpr, BITS: tl.constexpr):
    """Code ``SUB`` of each packed word as the exact fp16 number 1024 + RAW * c (``RAW`` = 16 for 4-bit codes, 1 for
    8-bit): the bits 0x6400 with the code or-ed into the mantissa, at bit 4 or bit 0. The kernel folds 1/RAW into
    its operands and takes the 1024 off after the dots, so turning codes into numbers costs no arithmetic."""
    c = (w >> (SUB * BITS)) & ((1 << BITS) - 1)
    if BITS == 4:
        c = c << 4
    return (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _unpack(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """The 4 codes of every word as 4 fp16 tiles of ``_raw`` numbers. On the GPU the 4-bit case is inline PTX on
    word pairs, 7 instructions for 8 codes: three shifts bring each word's nibbles 0, 2 and 3 to bit 4, where
    nibble 1 already is, and one ``lop3`` per nibble keeps it and ors in 0x6400. The decode kernel is bound by its
    instruction count; converting the codes exactly (1024 + c, then subtracting 1024) took 9 instructions. The
    interpreter runs ``_raw``."""
    if ASM and BITS == 4:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 s0, s2, s3, nib, mag;
            mov.b32 nib, 0x00F000F0;
            mov.b32 mag, 0x64006400;
            shl.b32 s0, $4, 4;
            shr.b32 s2, $4, 4;
            shr.b32 s3, $4, 8;
            lop3.b32 $0, s0, nib, mag, 0xea;
            lop3.b32 $1, $4, nib, mag, 0xea;
            lop3.b32 $2, s2, nib, mag, 0xea;
            lop3.b32 $3, s3, nib, mag, 0xea;
            }""",
            "=r,=r,=r,=r,r", [w], dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=2,
        )  # fmt: skip
    return _raw(w, 0, BITS), _raw(w, 1, BITS), _raw(w, 2, BITS), _raw(w, 3, BITS)


@triton.jit
def _offset(tiles, OFFSET: tl.constexpr):
    """The ``_raw`` tiles as they enter the dots: as they are, or as fp32 without the 1024 when OFFSET is 0."""
    t0, t1, t2, t3 = tiles
    if OFFSET == 0:
        t0, t1 = t0.to(tl.float32) - 1024.0, t1.to(tl.float32) - 1024.0
        t2, t3 = t2.to(tl.float32) - 1024.0, t3.to(tl.float32) - 1024.0
    return t0, t1, t2, t3


@triton.jit
def _channels(j, SUB: tl.constexpr, BITS: tl.constexpr, D: tl.constexpr):
    """Channel of code ``SUB`` in word ``j``. Words are 4 codes: int16 (4-bit: bytes 2j, 2j+1, each holding
    channel b in its low nibble and b + D/2 in its high one) or int32 (8-bit: bytes 4j..4j+3)."""
    CPB: tl.constexpr = 8 // BITS  # codes per byte
    BPW: tl.constexpr = 4 // CPB  # bytes per word
    return BPW * j + SUB // CPB + (SUB % CPB) * (D // 2)


@triton.jit
def _block_scales(
    ks_h, kz_h, vz_h, b, c0, c1, c2, c3, D: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Block ``b``'s key scales and zeros for the channels of the 4 code sub-tiles, and its value zeros."""
    sz = (b * BLOCK_N // GROUP) * D
    return (
        tl.load(ks_h + sz + c0), tl.load(kz_h + sz + c0), tl.load(ks_h + sz + c1), tl.load(kz_h + sz + c1),
        tl.load(ks_h + sz + c2), tl.load(kz_h + sz + c2), tl.load(ks_h + sz + c3), tl.load(kz_h + sz + c3),
        tl.load(vz_h + b * BLOCK_N + tl.arange(0, BLOCK_N)),
    )  # fmt: skip


@triton.jit
def _attn_codes_kernel(
    q_ptr, k_desc, ks_ptr, kz_ptr, v_desc, vs_ptr, vz_ptr, o_ptr, lse_ptr, len_ptr,
    n_rows, blocks_per_split, n_blocks, qk_scale,
    s_qt, s_qh, s_ksh, s_vsh,
    s_oh, s_os, s_ot, s_og, s_lh, s_ls, s_lt, s_lg,
    G: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT: tl.constexpr, LEN_FROM_PTR: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """Program (kv head, split, row tile): online softmax over the split's tokens for rows ``t * G + g``.
    The 4 codes of a word form 4 sub-tiles of W = D/4 channels each, so every dot has K or N = W. The codes come
    in through tensor descriptors (``k_desc``/``v_desc``, words [Hkv, N, W]): the copy engine computes the addresses
    that the programs spent about a tenth of their instructions on.

    The dots are transposed so the query rows are their N (padded to 8, not 16): keys as codes [BLOCK_N, W] @
    q [W, rows], values as codes^T [W, BLOCK_N] @ p [BLOCK_N, rows]. That halves their tensor-core work, and the
    scores, softmax and accumulators stay [tokens or channels, rows] with no transpose between the two dots.

    ``LEN_FROM_PTR``: the token count is read from ``len_ptr`` (int32, on the device: CUDA-graph replays) and
    split evenly over the fixed grid; a program with no tokens writes zeros and lse = -inf.

    The 1024 offsets of the ``_raw`` codes are taken off exactly: the correction sums the fp16 operands the tensor
    cores saw. fp32 queries (the interpreter's tests, fp32 models) get codes without the offset instead, as ``ieee``
    dots: the offset's cancellation costs fp32 a few bits that fp16 operands do not have."""
    h, split, mt = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if LEN_FROM_PTR:
        n_blocks = tl.load(len_ptr) // BLOCK_N
        blocks_per_split = tl.cdiv(n_blocks, tl.num_programs(1))
    W: tl.constexpr = D // 4
    RAW: tl.constexpr = 16 if BITS == 4 else 1  # the _raw codes' scale
    PREC: tl.constexpr = "ieee" if DOT == tl.float32 else "tf32"
    OFFSET: tl.constexpr = 0.0 if DOT == tl.float32 else 1024.0  # the codes' offset as the dots see them
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    t, g = rows // G, rows % G
    j = tl.arange(0, W)
    c0, c1 = _channels(j, 0, BITS, D), _channels(j, 1, BITS, D)
    c2, c3 = _channels(j, 2, BITS, D), _channels(j, 3, BITS, D)
    q_rows = (q_ptr + t * s_qt + (h * G + g) * s_qh)[:, None]
    qm = row_ok[:, None]
    q_scale = qk_scale / RAW
    q0 = tl.load(q_rows + c0[None, :], mask=qm, other=0.0).to(tl.float32) * q_scale
    q1 = tl.load(q_rows + c1[None, :], mask=qm, other=0.0).to(tl.float32) * q_scale
    q2 = tl.load(q_rows + c2[None, :], mask=qm, other=0.0).to(tl.float32) * q_scale
    q3 = tl.load(q_rows + c3[None, :], mask=qm, other=0.0).to(tl.float32) * q_scale

    qT0, qT1, qT2, qT3 = tl.trans(q0), tl.trans(q1), tl.trans(q2), tl.trans(q3)  # [W, BLOCK_M]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    a0 = tl.zeros([W, BLOCK_M], tl.float32)
    a1 = tl.zeros([W, BLOCK_M], tl.float32)
    a2 = tl.zeros([W, BLOCK_M], tl.float32)
    a3 = tl.zeros([W, BLOCK_M], tl.float32)
    az = tl.zeros([BLOCK_M], tl.float32)  # sum_t p_t * z_t, the value zeros' share
    offs_n = tl.arange(0, BLOCK_N)
    ks_h, kz_h = ks_ptr + h * s_ksh, kz_ptr + h * s_ksh
    vs_h, vz_h = vs_ptr + h * s_vsh, vz_ptr + h * s_vsh
    b_start = split * blocks_per_split
    b_end = tl.minimum(b_start + blocks_per_split, n_blocks)
    # Each block's scales and zeros are loaded one block ahead: loaded where they are used, their latency stalled
    # every iteration (strided, too small for the asynchronous copies that pipeline the codes).
    first = tl.where(b_start < b_end, b_start, 0)  # an empty split (device lengths) reads block 0
    b_last = tl.maximum(b_end - 1, b_start)
    s0, z0, s1, z1, s2, z2, s3, z3, vz = _block_scales(
        ks_h, kz_h, vz_h, first, c0, c1, c2, c3, D, GROUP, BLOCK_N
    )
    for b in range(b_start, b_end):
        tok = b * BLOCK_N + offs_n
        ks0, kz0, ks1, kz1, ks2, kz2, ks3, kz3, vzb = s0, z0, s1, z1, s2, z2, s3, z3, vz
        nxt = tl.minimum(b + 1, b_last)
        s0, z0, s1, z1, s2, z2, s3, z3, vz = _block_scales(
            ks_h, kz_h, vz_h, nxt, c0, c1, c2, c3, D, GROUP, BLOCK_N
        )
        # Keys: fold the block's group scale into q (BLOCK_N divides GROUP); its zero and the codes' 1024 go into a
        # per-row bias.
        ks0, kz0, ks1, kz1 = ks0.to(tl.float32), kz0.to(tl.float32), ks1.to(tl.float32), kz1.to(tl.float32)
        ks2, kz2, ks3, kz3 = ks2.to(tl.float32), kz2.to(tl.float32), ks3.to(tl.float32), kz3.to(tl.float32)
        qs0, qs1 = (qT0 * ks0[:, None]).to(DOT), (qT1 * ks1[:, None]).to(DOT)
        qs2, qs3 = (qT2 * ks2[:, None]).to(DOT), (qT3 * ks3[:, None]).to(DOT)
        zero = qT0 * kz0[:, None] + qT1 * kz1[:, None] + qT2 * kz2[:, None] + qT3 * kz3[:, None]
        ones = qs0.to(tl.float32) + qs1.to(tl.float32) + qs2.to(tl.float32) + qs3.to(tl.float32)
        bias = tl.sum(RAW * zero - OFFSET * ones, 0)
        words = k_desc.load([h, b * BLOCK_N, 0]).reshape(BLOCK_N, W)
        k0, k1, k2, k3 = _offset(_unpack(words, BITS, ASM), OFFSET)
        qk = tl.dot(k0.to(DOT), qs0, input_precision=PREC)  # [BLOCK_N, BLOCK_M]
        qk = tl.dot(k1.to(DOT), qs1, qk, input_precision=PREC)
        qk = tl.dot(k2.to(DOT), qs2, qk, input_precision=PREC)
        qk = tl.dot(k3.to(DOT), qs3, qk, input_precision=PREC)
        qk = qk + bias[None, :]  # [BLOCK_N, BLOCK_M]

        m_new = tl.maximum(m_i, tl.max(qk, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, 0)
        m_i = m_new

        # Values: fold the per-token scale into p and the per-token zero into az. Each block's codes^T @ p starts
        # from zero and loses its 1024s before it joins the running sums in fp32: accumulated in the tensor cores
        # over thousands of blocks, the 1024s' share would swamp the values' small differences.
        vs = tl.load(vs_h + tok).to(tl.float32)
        ps = (p * vs[:, None]).to(DOT)
        az = az * alpha + tl.sum(p * vzb.to(tl.float32)[:, None], 0)
        words = v_desc.load([h, b * BLOCK_N, 0]).reshape(BLOCK_N, W)
        v0, v1, v2, v3 = _offset(_unpack(words, BITS, ASM), OFFSET)
        ones = (OFFSET / RAW * tl.sum(ps.to(tl.float32), 0))[None, :]
        vt0, vt1 = tl.trans(v0.to(DOT)), tl.trans(v1.to(DOT))  # [W, BLOCK_N]
        vt2, vt3 = tl.trans(v2.to(DOT)), tl.trans(v3.to(DOT))
        a0 = a0 * alpha[None, :] + (tl.dot(vt0, ps, input_precision=PREC) * (1.0 / RAW) - ones)
        a1 = a1 * alpha[None, :] + (tl.dot(vt1, ps, input_precision=PREC) * (1.0 / RAW) - ones)
        a2 = a2 * alpha[None, :] + (tl.dot(vt2, ps, input_precision=PREC) * (1.0 / RAW) - ones)
        a3 = a3 * alpha[None, :] + (tl.dot(vt3, ps, input_precision=PREC) * (1.0 / RAW) - ones)

    inv_l = tl.where(l_i > 0, 1.0 / l_i, 0.0)  # an empty split (device lengths) contributes nothing
    zs = (az * inv_l)[None, :]
    o_cols = (o_ptr + h * s_oh + split * s_os + t * s_ot + g * s_og)[None, :]
    ty = o_ptr.dtype.element_ty
    qmT = row_ok[None, :]
    tl.store(o_cols + c0[:, None], (a0 * inv_l[None, :] + zs).to(ty), mask=qmT)
    tl.store(o_cols + c1[:, None], (a1 * inv_l[None, :] + zs).to(ty), mask=qmT)
    tl.store(o_cols + c2[:, None], (a2 * inv_l[None, :] + zs).to(ty), mask=qmT)
    tl.store(o_cols + c3[:, None], (a3 * inv_l[None, :] + zs).to(ty), mask=qmT)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + h * s_lh + split * s_ls + t * s_lt + g * s_lg, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    po_ptr, plse_ptr, o_ptr, lse_ptr, n_splits, n_rows, code_splits, code_heads, s_ot, s_oh, s_lt, s_lh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (kv head, row, ``BLOCK_D`` channels): weights exp(lse_s - lse) over the splits' partial
    outputs [kv head, split, row] (a few programs per row, so that more SMs read the partials). Splits below
    ``code_splits`` exist only for kv heads below ``code_heads``: the graph step's buffer holds the code kernel's
    splits of the retrieval heads, then the step kernel's chunks of every head
    (``duo_qserve.kernels.decode_step``); ``decode_attention`` passes 0."""
    pid, dc = tl.program_id(0), tl.program_id(1)
    h, r = pid // n_rows, pid % n_rows
    t, g = r // G, r % G
    s = tl.arange(0, BLOCK_S)
    s_ok = (s >= tl.where(h < code_heads, 0, code_splits)) & (s < n_splits)
    part = (h * n_splits + s) * n_rows + r
    lse = tl.load(plse_ptr + part, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty (device lengths): zeros, lse = -inf
    w = tl.exp(lse - m)
    tot = tl.sum(w, 0)
    d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    o = tl.load(po_ptr + part[:, None] * D + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.maximum(tot, 1e-30)
    hq = h * G + g
    tl.store(o_ptr + t * s_ot + hq * s_oh + d, out.to(o_ptr.dtype.element_ty))
    if dc == 0:
        tl.store(lse_ptr + t * s_lt + hq * s_lh, m + tl.log(tot))


def _block_m(n_rows: int, block_m: int | None) -> int:
    """Query rows per program: as few as there are (at least 4). The dots pad the rows to the tensor cores' 8
    anyway, but the softmax and rescaling run on the real rows only, which is what a decode step's 4 rows per kv
    head need."""
    return block_m or max(4, triton.next_power_of_2(min(n_rows, 64)))


class _Program(NamedTuple):
    block_n: int  # tokens per block
    num_warps: int
    num_stages: int
    waves: float  # programs per SM the split count aims at


def _program(block_m: int) -> _Program:
    """The code kernel's default launch config for row tiles of ``block_m`` query rows.

    A decode step's 4 rows per kv head: one warp over 64-token blocks, 12 programs per SM: on Hopper each takes 168
    registers (12 x 168 x 32 of the SM's 65,536), so the grid is exactly one full wave, and two pipeline stages
    suffice; one warp needs no barriers nor cross-warp reductions. More rows (several queries, or more query heads
    per kv head) keep 2 warps over 128 tokens, 4 programs per SM. (Measurements: docs/experiments.md.)"""
    return _Program(64, 1, 2, 12.0) if block_m <= 4 else _Program(128, 2, 3, 4.0)


def code_kernel_fits(d: int) -> bool:
    """Whether the split-K code kernel takes head_dim ``d``: it cuts the channels into 4 sub-tiles of d / 4, which
    the tensor cores' dots need as a power of two of at least 16, and the descriptors need code rows of at least 16
    bytes. Smaller powers of two go through the slab path."""
    return d >= 64 and d & (d - 1) == 0


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _check_cache(q: torch.Tensor, a: QuantArena) -> None:
    t, hq, d = q.shape
    hkv, n, _ = a.k_data.shape
    bits, group, n_quant = a.bits, a.group, a.n_quant
    qmax(bits)
    if hq % hkv or d % 8 or n_quant % group or n_quant > n:
        raise ValueError(
            f"q {tuple(q.shape)} vs cache {tuple(a.k_data.shape)}, n_quant {n_quant}, group {group}"
        )
    if tuple(a.k_data.shape) != (hkv, n, d * bits // 8) or a.v_data.shape != a.k_data.shape:
        raise ValueError(f"k_data/v_data must be [Hkv, N, D*bits/8] = {(hkv, n, d * bits // 8)}")
    if tuple(a.k_scale.shape) != (hkv, n // group, d) or a.k_zero.shape != a.k_scale.shape:
        raise ValueError(f"k_scale/k_zero must be [Hkv, N/group, D] = {(hkv, n // group, d)}")
    if tuple(a.v_scale.shape) != (hkv, n) or a.v_zero.shape != a.v_scale.shape:
        raise ValueError(f"v_scale/v_zero must be [Hkv, N] = {(hkv, n)}")
    if not all(x.is_contiguous() for x in a.tensors):
        raise ValueError("the quantized cache tensors must be contiguous")


def decode_splits(
    q: torch.Tensor, arena: QuantArena, block_n: int | None = None, waves: float | None = None,
    num_splits: int | None = None, block_m: int | None = None, max_splits: int = MAX_SPLITS,
) -> int:  # fmt: skip
    """How many splits ``decode_attention`` cuts the tokens into: at most ``waves`` (kv head, split, row tile)
    programs per SM, so one long sequence at batch 1 fills the GPU in one wave (``num_splits``: asked for,
    clamped): a few programs more than an SM holds at once would run as a second, nearly empty wave.
    ``block_n``, ``waves``: see ``_program``."""
    t, hq, _ = q.shape
    hkv, capacity, _ = arena.k_data.shape
    n_rows = t * hq // hkv
    block_m = _block_m(n_rows, block_m)
    default = _program(block_m)
    block_n, waves = block_n or default.block_n, waves or default.waves
    n_blocks = (capacity if arena.on_device else arena.n_quant) // min(block_n, arena.group)
    if num_splits is None:
        num_splits = int(waves * _sm_count(q.device)) // (hkv * triton.cdiv(n_rows, block_m))
    num_splits = max(1, min(num_splits, n_blocks, max_splits))
    return triton.cdiv(n_blocks, triton.cdiv(n_blocks, num_splits))  # no empty split for a host length


def code_partials(
    q: torch.Tensor, arena: QuantArena, sm_scale: float, po: torch.Tensor, plse: torch.Tensor, num_splits: int,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None, block_m: int | None = None,
) -> None:  # fmt: skip
    """The split-K code kernel writing row r of split s of kv head h to ``po[h, s, r]`` and ``plse[h, s, r]``
    (``po`` [>= Hkv, >= num_splits, T * G, D] float32, contiguous): the partials for ``merge_partials``."""
    g = q.shape[1] // arena.k_data.shape[0]
    so = (po.stride(0), po.stride(1), g * po.stride(2), po.stride(2))
    sl = (plse.stride(0), plse.stride(1), g * plse.stride(2), plse.stride(2))
    _launch_codes(q, arena, sm_scale, po, plse, so, sl, num_splits, block_n, num_warps, num_stages, block_m)


def merge_partials(
    po: torch.Tensor, plse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, code_splits: int = 0,
    code_heads: int = 0,
) -> None:  # fmt: skip
    """Combine the partials po [Hkv, S, T * G, D] / plse [Hkv, S, T * G] into out [T, Hkv * G, D] and lse
    [T, Hkv * G]; splits below ``code_splits`` count only for kv heads below ``code_heads`` (see the kernel)."""
    hkv, n_splits, n_rows, d = po.shape
    block_s = triton.next_power_of_2(n_splits)
    block_d = min(d, 32, max(8, 8192 // block_s))  # 32 channels; fewer past 8K partials per tile
    _merge_splits_kernel[(hkv * n_rows, d // block_d)](
        po, plse, out, lse, n_splits, n_rows, code_splits, code_heads,
        out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
        G=out.shape[1] // hkv, D=d, BLOCK_S=block_s, BLOCK_D=block_d,
        num_warps=max(4, min(16, block_s * block_d // 4096)),  # the [BLOCK_S, BLOCK_D] fp32 tile fits
    )  # fmt: skip


def _words(data: torch.Tensor, bits: int, block_n: int) -> TensorDescriptor:
    """Packed codes [Hkv, N, D * bits / 8] as words of 4 codes (int16 for 4-bit, int32 for 8-bit), for loads of
    ``block_n`` tokens of one head."""
    words = data.view(torch.int16 if bits == 4 else torch.int32)
    if (
        words.stride(-1) != 1
        or words.data_ptr() % 16
        or any(x * words.element_size() % 16 for x in words.stride()[:2])
    ):
        raise ValueError(
            f"the code kernel needs 16-byte aligned code rows, got strides {tuple(data.stride())}"
        )
    return TensorDescriptor(words, list(words.shape), list(words.stride()), [1, block_n, words.shape[-1]])


def _launch_codes(
    q, a: QuantArena, sm_scale, po, plse, so, sl, num_splits, block_n, num_warps, num_stages, block_m
) -> None:
    """One launch of the code kernel: split s of kv head h at ``po + h * so[0] + s * so[1]`` (``sl`` for lse)."""
    t, hq, d = q.shape
    hkv, capacity, _ = a.k_data.shape
    n_rows = t * hq // hkv
    block_m = _block_m(n_rows, block_m)
    default = _program(block_m)
    block_n, num_warps = min(block_n or default.block_n, a.group), num_warps or default.num_warps
    num_stages = num_stages or default.num_stages
    len_arg = a.n_quant if a.on_device else q  # any pointer: unread unless LEN_FROM_PTR
    n_blocks = (capacity if a.on_device else a.n_quant) // block_n
    dot = tl.float32 if q.dtype == torch.float32 else tl.float16
    _attn_codes_kernel[(hkv, num_splits, triton.cdiv(n_rows, block_m))](
        q, _words(a.k_data, a.bits, block_n), a.k_scale, a.k_zero, _words(a.v_data, a.bits, block_n), a.v_scale,
        a.v_zero, po, plse, len_arg, n_rows, triton.cdiv(n_blocks, num_splits), n_blocks, sm_scale * LOG2E,
        q.stride(0), q.stride(1), a.k_scale.stride(0), a.v_scale.stride(0),
        *so, *sl,
        G=hq // hkv, D=d, BITS=a.bits, GROUP=a.group, BLOCK_M=block_m, BLOCK_N=block_n, DOT=dot,
        LEN_FROM_PTR=a.on_device, ASM=not INTERPRETED, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor, arena: QuantArena, sm_scale: float,
    block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None, waves: float | None = None,
    num_splits: int | None = None, block_m: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The split-K code kernel (same arguments and result as ``reference``; ``n_quant > 0``).

    Splits: ``decode_splits``; with one split the kernel writes the result directly, without the merge kernel.
    Launch config left as None: ``_program``.

    ``n_quant`` may be on the device (a multiple of ``group``, possibly 0): the grid is then sized for the whole
    capacity and every program reads the length on the device, so one launch serves every length (CUDA graphs).
    The result has lse = -inf where nothing was attended.
    """
    t, hq, d = q.shape
    hkv = arena.k_data.shape[0]
    g = hq // hkv
    num_splits = decode_splits(q, arena, block_n, waves, num_splits, block_m)
    config = (block_n, num_warps, num_stages, block_m)
    out = torch.empty_like(q)
    lse = torch.empty((t, hq), dtype=torch.float32, device=q.device)
    if num_splits == 1:  # write [T, Hq, ...] directly: row (t, g) of kv head h is query head h * G + g
        so = (g * out.stride(1), 0, out.stride(0), out.stride(1))
        sl = (g * lse.stride(1), 0, lse.stride(0), lse.stride(1))
        _launch_codes(q, arena, sm_scale, out, lse, so, sl, 1, *config)
        return out, lse
    po = torch.empty((hkv, num_splits, t * g, d), dtype=torch.float32, device=q.device)
    plse = torch.empty((hkv, num_splits, t * g), dtype=torch.float32, device=q.device)
    code_partials(q, arena, sm_scale, po, plse, num_splits, *config)
    merge_partials(po, plse, out, lse)
    return out, lse


# ---------------------------------------------------------------------------------------------------- pre-fill


@triton.jit
def _dequant_kernel(
    kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, ko_ptr, vo_ptr, start,
    s_kdh, s_ksh, s_vdh, s_vsh, s_oh,
    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Tokens ``start + [pid1 * BLOCK_N, +BLOCK_N)`` of kv head pid0 to fp rows of ko/vo (exactly the reference's
    ``code * scale + zero``, rounded once to the output dtype). Works on half-vectors, the packing's unit."""
    h = tl.program_id(0)
    HALF: tl.constexpr = D // 2
    BYTES: tl.constexpr = D * BITS // 8
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    tok = start + local
    half = tl.arange(0, HALF)[None, :]
    o = h * s_oh + local * D + half
    ty = ko_ptr.dtype.element_ty

    kb = kd_ptr + h * s_kdh + tok * BYTES + half
    vb = vd_ptr + h * s_vdh + tok * BYTES + half
    if BITS == 4:
        kp, vp = tl.load(kb), tl.load(vb)
        k_lo, k_hi, v_lo, v_hi = kp & 0xF, kp >> 4, vp & 0xF, vp >> 4
    else:
        k_lo, k_hi, v_lo, v_hi = tl.load(kb), tl.load(kb + HALF), tl.load(vb), tl.load(vb + HALF)
    ksz = h * s_ksh + (tok // GROUP) * D + half
    k_lo = k_lo.to(tl.float32) * tl.load(ks_ptr + ksz).to(tl.float32) + tl.load(kz_ptr + ksz).to(tl.float32)
    k_hi = k_hi.to(tl.float32) * tl.load(ks_ptr + ksz + HALF).to(tl.float32) + tl.load(
        kz_ptr + ksz + HALF
    ).to(tl.float32)
    tl.store(ko_ptr + o, k_lo.to(ty))
    tl.store(ko_ptr + o + HALF, k_hi.to(ty))
    vs = tl.load(vs_ptr + h * s_vsh + tok).to(tl.float32)
    vz = tl.load(vz_ptr + h * s_vsh + tok).to(tl.float32)
    tl.store(vo_ptr + o, (v_lo.to(tl.float32) * vs + vz).to(ty))
    tl.store(vo_ptr + o + HALF, (v_hi.to(tl.float32) * vs + vz).to(ty))


def dequantize_kv(arena: QuantArena, start: int, n: int, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
    """Tokens ``[start, start + n)`` (whole groups) of the arena into ``k_out``/``v_out`` [Hkv, >= n, D]
    (contiguous)."""
    a = arena
    hkv, _, d = k_out.shape
    block_n = min(64, a.group)
    _dequant_kernel[(hkv, n // block_n)](
        *a.tensors, k_out, v_out, start,
        a.k_data.stride(0), a.k_scale.stride(0), a.v_data.stride(0), a.v_scale.stride(0), k_out.stride(0),
        D=d, BITS=a.bits, GROUP=a.group, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip


def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, kernel: str = "auto"):
    """Non-causal attention with log-sum-exp: q [H, M, D], k/v [H, S, D] -> (out [H, M, D], lse [H, M] fp32).

    On CUDA the fused library kernels (``fused_attention``); on CPU the fp32 reference math."""
    if not q.is_cuda:
        out, lse = dense_attention(q.transpose(0, 1), k, v, n_ctx=k.shape[1], sm_scale=sm_scale)
        return out.transpose(0, 1), lse.transpose(0, 1)
    out, lse = fused_attention(q[None], k[None], v[None], False, sm_scale, kernel)
    return out[0], lse[0]


def prefill_attention(
    q: torch.Tensor, arena: QuantArena, sm_scale: float, slab_bytes: int = SLAB_BYTES, kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab path: de-quantize at most ``slab_bytes`` of K+V at a time into one reused buffer, attend with
    ``sdpa_lse``, merge slabs by lse. Queries are regrouped per kv head as [Hkv, T * G, D] (non-causal, so the
    G query heads of a kv head are just more rows): no GQA support needed and longer query tiles."""
    t, hq, d = q.shape
    hkv = arena.k_data.shape[0]
    g = hq // hkv
    fp = q.dtype
    group, n_quant = arena.group, arena.n_quant
    slab = max(group, slab_bytes // (2 * hkv * d * q.element_size()) // group * group)
    slab = min(slab, n_quant)
    kbuf = torch.empty((hkv, slab, d), dtype=fp, device=q.device)
    vbuf = torch.empty_like(kbuf)
    qh = q.reshape(t, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, t * g, d)
    out = lse = None
    for start in range(0, n_quant, slab):
        n = min(slab, n_quant - start)
        dequantize_kv(arena, start, n, kbuf, vbuf)
        o, s = sdpa_lse(qh, kbuf[:, :n], vbuf[:, :n], sm_scale, kernel)
        out, lse = (o.float(), s) if out is None else merge(out, lse, o.float(), s)
    out = out.to(fp).reshape(hkv, t, g, d).permute(1, 0, 2, 3).reshape(t, hq, d)
    return out, lse.reshape(hkv, t, g).permute(1, 0, 2).reshape(t, hq)


def quantized_prefix_attention(
    q: torch.Tensor, arena: QuantArena, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch used by the cache (host ``n_quant``): the reference on CPU (unless ``DUO_QSERVE_TRITON=1``), else
    the code kernel for up to ``DECODE_MAX_T`` queries (and a head size it takes) and the slab path for the rest."""
    _check_cache(q, arena)
    if not use_triton(backend(), q, INTERPRETED):
        return reference(q, arena, sm_scale)
    if arena.n_quant == 0:
        return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), device=q.device)
    d = q.shape[2]
    if d & (d - 1):
        raise ValueError(f"head_dim {d}: the quantized-cache kernels need a power of two (as 64 or 128)")
    q = q if q.stride(-1) == 1 else q.contiguous()
    decode = q.shape[0] <= DECODE_MAX_T and code_kernel_fits(d)
    path = decode_attention if decode else prefill_attention
    return path(q, arena, sm_scale)
