"""Quantize-on-write for the retrieval-head cache: whole key groups of new keys/values to codes + scales.

One Triton program per (head, key group) reads the group's fp keys and values once and writes the packed codes
and the fp16 scales/zeros in the format of ``duo_qserve.quant.kv_quant`` (keys per channel over the group,
values per token, 4-bit split-half packing). The codes are bit-identical to the reference: the divisions are
IEEE round-to-nearest (``tl.div_rn``, as torch's) and the rounding is round-half-to-even like ``torch.round``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from duo_qserve import environment
from duo_qserve.kernels import INTERPRETED, use_triton
from duo_qserve.quant.kv_quant import SCALE_DTYPE, qmax, quantize_keys, quantize_values


def backend() -> str:
    """The ``use_triton`` backend: "triton" when ``DUO_QSERVE_TRITON=1`` (CPU tensors too, interpreted)."""
    return "triton" if environment.triton_on_cpu() else "auto"


def reference(k: torch.Tensor, v: torch.Tensor, bits: int, group: int):
    kd, ks, kz = quantize_keys(k, bits, group)
    vd, vs, vz = quantize_values(v, bits)
    return kd, ks, kz, vd, vs, vz


@triton.jit
def _round_half_even(x):
    # Adding 1.5 * 2^23 leaves no fraction bits, so the fp32 add rounds to an integer half-to-even (torch.round's
    # rule) for |x| < 2^22; libdevice's rint would do the same but the interpreter has no libdevice.
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _codes(x, lo, hi, QMAX: tl.constexpr):
    """``kv_quant._codes`` step for step: fp16 scale/zero first, then codes against the stored (rounded) values."""
    scale = tl.div_rn(hi - lo, QMAX * 1.0).to(tl.float16)
    zero = lo.to(tl.float16)
    s = tl.maximum(scale.to(tl.float32), 1e-8)
    q = _round_half_even(tl.div_rn(x - zero.to(tl.float32), s))
    return tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0).to(tl.int32), scale, zero


@triton.jit
def _store_codes(ptr, c_lo, c_hi, half, BITS: tl.constexpr, HALF: tl.constexpr):
    """Codes of channels ``half`` (c_lo) and ``half + D/2`` (c_hi): split-half nibbles for 4-bit, plain bytes for 8."""
    if BITS == 4:
        tl.store(ptr + half, (c_lo | (c_hi << 4)).to(tl.uint8))
    else:
        tl.store(ptr + half, c_lo.to(tl.uint8))
        tl.store(ptr + HALF + half, c_hi.to(tl.uint8))


@triton.jit
def _quantize_kv_kernel(
    k_ptr, v_ptr, kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr,
    s_kh, s_kt, s_vh, s_vt, s_kdh, s_kdt, s_ksh, s_ksg, s_vdh, s_vdt, s_vsh, s_vst,
    D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    h, grp = tl.program_id(0), tl.program_id(1)
    HALF: tl.constexpr = D // 2
    QMAX: tl.constexpr = (1 << BITS) - 1
    tok = grp * GROUP + tl.arange(0, GROUP)[:, None]
    half = tl.arange(0, HALF)[None, :]

    # Keys: one scale/zero per channel over the group's tokens (axis 0).
    kp = k_ptr + h * s_kh + tok * s_kt + half
    k_lo, k_hi = tl.load(kp).to(tl.float32), tl.load(kp + HALF).to(tl.float32)
    c_lo, s_lo, z_lo = _codes(k_lo, tl.min(k_lo, 0)[None, :], tl.max(k_lo, 0)[None, :], QMAX)
    c_hi, s_hi, z_hi = _codes(k_hi, tl.min(k_hi, 0)[None, :], tl.max(k_hi, 0)[None, :], QMAX)
    _store_codes(kd_ptr + h * s_kdh + tok * s_kdt, c_lo, c_hi, half, BITS, HALF)
    sp = h * s_ksh + grp * s_ksg + half
    tl.store(ks_ptr + sp, s_lo)
    tl.store(ks_ptr + sp + HALF, s_hi)
    tl.store(kz_ptr + sp, z_lo)
    tl.store(kz_ptr + sp + HALF, z_hi)

    # Values: one scale/zero per token over both halves of the head dimension (axis 1).
    vp = v_ptr + h * s_vh + tok * s_vt + half
    v_lo, v_hi = tl.load(vp).to(tl.float32), tl.load(vp + HALF).to(tl.float32)
    lo = tl.minimum(tl.min(v_lo, 1), tl.min(v_hi, 1))[:, None]
    hi = tl.maximum(tl.max(v_lo, 1), tl.max(v_hi, 1))[:, None]
    c_lo, scale, zero = _codes(v_lo, lo, hi, QMAX)
    c_hi, _, _ = _codes(v_hi, lo, hi, QMAX)
    _store_codes(vd_ptr + h * s_vdh + tok * s_vdt, c_lo, c_hi, half, BITS, HALF)
    tl.store(vs_ptr + h * s_vsh + tok * s_vst, scale)
    tl.store(vz_ptr + h * s_vsh + tok * s_vst, zero)


def _triton(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, out: tuple) -> tuple:
    h, t, d = k.shape
    kd, ks, kz, vd, vs, vz = out
    if t:
        _quantize_kv_kernel[(h, t // group)](
            k, v, kd, ks, kz, vd, vs, vz,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), kd.stride(0), kd.stride(1),
            ks.stride(0), ks.stride(1), vd.stride(0), vd.stride(1), vs.stride(0), vs.stride(1),
            D=d, BITS=bits, GROUP=group, num_warps=8 if group * d >= 8192 else 4,
        )  # fmt: skip
    return out


def quantize_kv(k: torch.Tensor, v: torch.Tensor, bits: int, group: int, out: tuple | None = None):
    """k, v [H, T, D] with T a multiple of ``group`` -> (k_data, k_scale, k_zero, v_data, v_scale, v_zero).

    ``out``: optional six tensors of those shapes to write into (e.g. slices of the cache arena; any strides with
    a contiguous last dimension), returned as the result.
    """
    h, t, d = k.shape
    qmax(bits)
    if v.shape != k.shape or t % group or d % 2:
        raise ValueError(
            f"need k, v [H, T, D] alike with T a multiple of {group}: {tuple(k.shape)}, {tuple(v.shape)}"
        )
    shapes = [
        (h, t, d * bits // 8),
        (h, t // group, d),
        (h, t // group, d),
        (h, t, d * bits // 8),
        (h, t),
        (h, t),
    ]
    dtypes = [torch.uint8, SCALE_DTYPE, SCALE_DTYPE, torch.uint8, SCALE_DTYPE, SCALE_DTYPE]
    if out is not None and (
        [tuple(o.shape) for o in out] != shapes
        or [o.dtype for o in out] != dtypes
        or any(o.stride(-1) != 1 for o in out)
    ):
        raise ValueError(
            f"out must be tensors of shapes {shapes} and dtypes {dtypes}, last dimension contiguous"
        )
    if not use_triton(backend(), k, INTERPRETED):
        res = reference(k, v, bits, group)
        if out is None:
            return res
        for o, r in zip(out, res, strict=True):
            o.copy_(r)
        return out
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if out is None:
        out = tuple(torch.empty(s, dtype=dt, device=k.device) for s, dt in zip(shapes, dtypes, strict=True))
    return _triton(k, v, bits, group, out)
