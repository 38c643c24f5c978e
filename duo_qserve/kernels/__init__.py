"""Triton kernels: one op per module, each with its ``@triton.jit`` kernel, launcher and PyTorch reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


def chained(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel that starts with ``wait_for_inputs``, on ``t``'s device.

    On Hopper and later such kernels use programmatic dependent launch: each is launched while the kernel before
    it is still running, and its programs wait in ``wait_for_inputs`` until that kernel has finished and its
    writes are visible. A batch-1 decode step is ~440 short kernels, so the launch it hides is paid ~440 times."""
    on = t.is_cuda and not INTERPRETED and torch.cuda.get_device_capability(t.device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """The first statement of a kernel launched with ``chained``: wait until the previous kernel has finished
    (nothing may be read or written before), then let the next one launch. Without PDL, a no-op."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
