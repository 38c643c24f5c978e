"""KV-cache quantization: the reference math that the cache stores and every kernel must match.

Keys are quantized **per channel** over groups of ``group`` consecutive tokens (keys have a few channels with
large, stable magnitudes; a per-token scale would be set by those outliers and crush every other channel).
Values are quantized **per token** (their outliers are spread across tokens, not channels).
Both are asymmetric: ``x ~= q * scale + zero`` with ``zero`` the minimum in real units and ``scale = (max-min)/qmax``.

4-bit data is packed "split-half": byte ``j`` of a ``head_dim``-vector holds channel ``j`` in its low nibble and
channel ``j + head_dim/2`` in its high nibble, so a kernel unpacks two contiguous half-vectors with one mask and
one shift, and ``q . k`` becomes two dots over halves with no interleaving.

Shapes: ``x`` is ``[heads, tokens, head_dim]``. Scales/zeros are fp16 (what the cache stores).
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.float16


def qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"quantized KV supports 4 or 8 bits, got {bits}")
    return (1 << bits) - 1


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., D] integer codes in 0..15 -> [..., D/2] uint8 (split-half nibbles)."""
    half = q.shape[-1] // 2
    lo, hi = q[..., :half].to(torch.uint8), q[..., half:].to(torch.uint8)
    return lo | (hi << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/2] uint8 -> [..., D] uint8 codes (inverse of ``pack_int4``)."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def _codes(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Asymmetric codes of x against broadcastable min/max; returns (codes uint8, scale, zero) in fp16 scales."""
    m = qmax(bits)
    scale = ((hi - lo) / m).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    # Quantize against the fp16-rounded scale/zero actually stored, so dequantization error stays within half a step.
    s = scale.float().clamp_min(1e-8)
    q = torch.round((x.float() - zero.float()) / s).clamp_(0, m).to(torch.uint8)
    return q, scale, zero


def quantize_keys(x: torch.Tensor, bits: int, group: int):
    """Per-channel keys: x [H, T, D] with T a multiple of ``group`` -> (data, scale [H, T/group, D], zero)."""
    h, t, d = x.shape
    if t % group:
        raise ValueError(f"key quantization needs whole groups of {group} tokens, got {t}")
    g = x.float().reshape(h, t // group, group, d)
    q, scale, zero = _codes(g, g.amin(dim=2, keepdim=True), g.amax(dim=2, keepdim=True), bits)
    q = q.reshape(h, t, d)
    data = pack_int4(q) if bits == 4 else q
    return data, scale.squeeze(2), zero.squeeze(2)


def dequantize_keys(data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int):
    q = unpack_int4(data) if bits == 4 else data
    h, t, d = q.shape
    g = q.float().reshape(h, t // group, group, d)
    x = g * scale.float().unsqueeze(2) + zero.float().unsqueeze(2)
    return x.reshape(h, t, d)


def quantize_values(x: torch.Tensor, bits: int):
    """Per-token values: x [H, T, D] -> (data, scale [H, T], zero [H, T])."""
    xf = x.float()
    q, scale, zero = _codes(xf, xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True), bits)
    data = pack_int4(q) if bits == 4 else q
    return data, scale.squeeze(-1), zero.squeeze(-1)


def dequantize_values(data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int):
    q = unpack_int4(data) if bits == 4 else data
    return q.float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)


def quantize_keys_per_token(x: torch.Tensor, bits: int):
    """Per-token keys (the reference demo's scheme), kept only to compare error against per-channel keys."""
    return quantize_values(x, bits)
