"""Triton kernels: one op per module, each with its ``@triton.jit`` kernel, launcher and PyTorch reference."""

from __future__ import annotations

import torch
import triton

INTERPRETED = bool(triton.knobs.runtime.interpret)


def use_triton(backend: str, t: torch.Tensor, interpreted: bool) -> bool:
    """Pick the path for ``backend`` ("auto" | "triton" | "reference").

    "auto" runs Triton on CUDA tensors and the reference on CPU. "triton" on CPU tensors needs the kernels to
    have been decorated under ``TRITON_INTERPRET=1`` (``interpreted``): how CPU tests run the real kernels.
    """
    if backend == "reference":
        return False
    if backend == "auto":
        return t.is_cuda
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if not (t.is_cuda or interpreted):
        raise ValueError(
            "Triton on CPU tensors needs TRITON_INTERPRET=1 set before the kernel module is imported"
        )
    return True
