"""Per-token int8 activation quantization, fused with the op that produces the activation.

Every W8A8 linear input is quantized symmetrically per token: ``scale = absmax / 127`` and
``q = round(y * 127 / absmax)`` (half away from zero). Fusing the quantization into RMSNorm, into SiLU*up and into
SiLU*up followed by a rotated model's blockwise Hadamard (one program per token, the whole row in registers) means
the float activation is never written to memory: the row is read once, and 1 byte per element plus one fp32 scale
is written. All math is fp32.

Each op has a plain-PyTorch ``*_reference`` that performs the same fp32 operations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED, use_triton
from .hadamard import fast_hadamard, hadamard_block

# Floor on a row's absmax, so an all-zero row gets a finite scale and zero codes.
_MIN_ABSMAX = 1e-10


@triton.jit
def _store_quantized_row(y, q_row_ptr, s_row_ptr, cols, mask):
    absmax = tl.maximum(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0), 1e-10)  # 1e-10 = _MIN_ABSMAX
    v = y * (127.0 / absmax)
    q = tl.where(v >= 0, tl.floor(v + 0.5), tl.ceil(v - 0.5))
    tl.store(q_row_ptr + cols, q.to(tl.int8), mask=mask)
    tl.store(s_row_ptr, absmax / 127.0)


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    y = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    _store_quantized_row(y, q_ptr + row * K, s_ptr + row, cols, mask)


@triton.jit
def _rmsnorm_quantize_kernel(x_ptr, w_ptr, q_ptr, s_ptr, K, stride_x, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / K + eps)
    _store_quantized_row(x * rstd * w, q_ptr + row * K, s_ptr + row, cols, mask)


@triton.jit
def _silu_mul_quantize_kernel(g_ptr, u_ptr, q_ptr, s_ptr, K, stride_g, stride_u, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    _store_quantized_row(g * tl.sigmoid(g) * u, q_ptr + row * K, s_ptr + row, cols, mask)


@triton.jit
def _silu_mul_hadamard_quantize_kernel(
    g_ptr, u_ptr, q_ptr, s_ptr, K, stride_g, stride_u, NB: tl.constexpr, B: tl.constexpr, LOG2B: tl.constexpr
):  # fmt: skip
    """One row: ``y = silu(g) * u`` as an [NB, B] tile (NB >= K / B blocks, a power of two, the rest masked),
    the Walsh-Hadamard transform of each block by ``LOG2B`` butterfly stages in registers, then quantized."""
    row = tl.program_id(0)
    cols = tl.arange(0, NB * B)  # block j holds columns [j * B, (j + 1) * B)
    mask = cols < K
    g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.reshape(g * tl.sigmoid(g) * u, (NB, B))
    for i in tl.static_range(LOG2B):
        # Stage i pairs lanes j and j + h (h = 2^i) within each 2h-lane span: (a, b) -> (a + b, a - b).
        pairs = tl.permute(tl.reshape(y, (NB, B >> (i + 1), 2, 1 << i)), (0, 1, 3, 2))
        a, b = tl.split(pairs)
        y = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (NB, B))
    y = tl.reshape(y, (NB * B,)) * (1.0 / tl.sqrt(float(B)))
    _store_quantized_row(y, q_ptr + row * K, s_ptr + row, cols, mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [rows, K] with unit stride along K (a view when possible)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_shape(k: int) -> tuple[int, int]:
    """Whole row in one block; more warps for longer rows keep registers per thread bounded."""
    block = triton.next_power_of_2(k)
    return block, 4 if block <= 2048 else 8 if block <= 8192 else 16


def _outputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    return q, torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)


def _quantize_rows_reference(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows -> (int8 codes, fp32 scale [..., 1]), the exact operations of ``_store_quantized_row``."""
    absmax = y.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_ABSMAX)
    v = y * (127.0 / absmax)
    q = torch.where(v >= 0, torch.floor(v + 0.5), torch.ceil(v - 0.5))
    return q.to(torch.int8), absmax / 127.0


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize_rows_reference(x.float())


def rmsnorm_quantize_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    return _quantize_rows_reference(xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float())


def silu_mul_quantize_reference(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = gate.float()
    return _quantize_rows_reference(g * torch.sigmoid(g) * up.float())


def silu_mul_hadamard_quantize_reference(
    gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    g = gate.float()
    return _quantize_rows_reference(fast_hadamard(g * torch.sigmoid(g) * up.float()))


def quantize_per_token(x: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float -> (q int8 [..., K], scale fp32 [..., 1]), symmetric absmax/127 per token."""
    if not use_triton(backend, x, INTERPRETED):
        return quantize_per_token_reference(x)
    q, s = _outputs(x)
    x2 = _rows(x)
    block, warps = _launch_shape(x2.shape[1])
    _quantize_kernel[(x2.shape[0],)](x2, q, s, x2.shape[1], x2.stride(0), BLOCK=block, num_warps=warps)
    return q, s


def rmsnorm_quantize(
    x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused RMSNorm * weight + per-token quant: x [..., K], weight [K] -> (q int8, scale [..., 1])."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"RMSNorm weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if not use_triton(backend, x, INTERPRETED):
        return rmsnorm_quantize_reference(x, weight, eps)
    q, s = _outputs(x)
    x2 = _rows(x)
    block, warps = _launch_shape(x2.shape[1])
    _rmsnorm_quantize_kernel[(x2.shape[0],)](
        x2, weight.contiguous(), q, s, x2.shape[1], x2.stride(0), eps, BLOCK=block, num_warps=warps
    )
    return q, s


def silu_mul_quantize(
    gate: torch.Tensor, up: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(gate) * up quantized per token, in one pass: gate, up [..., K] -> (q int8, scale [..., 1])."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if not use_triton(backend, gate, INTERPRETED):
        return silu_mul_quantize_reference(gate, up)
    q, s = _outputs(gate)
    g2, u2 = _rows(gate), _rows(up)
    block, warps = _launch_shape(g2.shape[1])
    _silu_mul_quantize_kernel[(g2.shape[0],)](
        g2, u2, q, s, g2.shape[1], g2.stride(0), u2.stride(0), BLOCK=block, num_warps=warps
    )
    return q, s


def silu_mul_hadamard_quantize(
    gate: torch.Tensor, up: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fast_hadamard(silu(gate) * up)`` quantized per token, in one pass: a rotated model's down_proj input.
    gate, up [..., K] -> (q int8, scale [..., 1]). The butterfly sums in another order than the reference's matrix
    product, so values agree to fp32 rounding (a code can move by one step at a .5 tie)."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if not use_triton(backend, gate, INTERPRETED):
        return silu_mul_hadamard_quantize_reference(gate, up)
    q, s = _outputs(gate)
    g2, u2 = _rows(gate), _rows(up)
    k = g2.shape[1]
    b = hadamard_block(k)
    nb = triton.next_power_of_2(k // b)
    _, warps = _launch_shape(nb * b)
    _silu_mul_hadamard_quantize_kernel[(g2.shape[0],)](
        g2, u2, q, s, k, g2.stride(0), u2.stride(0), NB=nb, B=b, LOG2B=b.bit_length() - 1, num_warps=warps
    )
    return q, s
