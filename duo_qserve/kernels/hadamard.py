"""The normalized Walsh-Hadamard transform, blockwise: the online transform of a rotated model
(``quant.rotation``), and the matrices its offline rotations are built from.

A Hadamard matrix of size ``n`` exists for ``n`` a power of two (Sylvester), but e.g. not for SmolLM2's 576 or
Qwen2.5-0.5B's 4864, so the transform works on the contiguous blocks of the largest power-of-two factor of
``n``. The fused GPU kernel that applies it between SiLU*up and the int8 quantization of down_proj's input is
``quantize_act.silu_mul_hadamard_quantize``.
"""

from __future__ import annotations

import functools

import torch


def hadamard_block(n: int) -> int:
    """The largest power of two dividing ``n``: the block size of ``fast_hadamard`` on ``n`` channels."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return n & -n


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix ``H`` [n, n] (``n`` a power of two): symmetric, ``H H = I``, and
    the matrix ``fast_hadamard`` applies (``fast_hadamard(x) == x @ H``)."""
    if n != hadamard_block(n):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / h.shape[0] ** 0.5


def fast_hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ blockdiag(H_b, ..., H_b)`` along the last axis, ``b = hadamard_block(x.shape[-1])``, in fp32 (or in
    x's dtype if wider), returned in x's dtype. Orthogonal and its own inverse.

    One batched matrix product with the cached ``H_b`` rather than the ``log2 b`` butterfly passes: on a GPU
    each pass is a kernel launch and a trip through memory, while the product is a single launch whose ``b``
    multiply-adds per element are small next to down_proj's own work."""
    n = x.shape[-1]
    b = hadamard_block(n)
    dtype = torch.promote_types(x.dtype, torch.float32)
    y = x.to(dtype).reshape(-1, n // b, b) @ _hadamard_on(b, dtype, x.device)
    return y.reshape(x.shape).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _hadamard_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return hadamard_matrix(n).to(dtype=dtype, device=device)
