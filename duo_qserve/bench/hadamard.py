"""What the online Hadamard of a rotated W8A8 model (``quant.rotation``) costs on the GPU (needs a CUDA GPU).

A rotated model's down_proj input is ``quantize_per_token(fast_hadamard(silu(gate) * up))``, run by one kernel
(``silu_mul_hadamard_quantize``, what ``w8a8.SiluMulHadamardQuant`` calls), where an unrotated one runs
``silu_mul_quantize``. Per shipped model (its intermediate size and layer count) this times both, and the same
transform composed of torch ops (``torch_hadamard``: the matrix product of ``fast_hadamard`` between the activation
and ``quantize_per_token``), at one decode row, captured in a CUDA graph as the decode step is, and at one pre-fill
chunk. It reports what the fused transform adds over ``silu_mul_quantize``: milliseconds per decode step and per
pre-fill chunk for the whole model, and seconds added to pre-filling 1M tokens. The transform does not depend on
the context length, so the decode cost per token at 1M context is the per-step figure.

    python -m duo_qserve.bench.hadamard --out DIR    # writes DIR/hadamard-<device>-<date>.json
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from duo_qserve.bench.common import bench, bench_graph, gpu_header, write_result
from duo_qserve.kernels.hadamard import fast_hadamard, hadamard_block
from duo_qserve.kernels.quantize_act import quantize_per_token, silu_mul_hadamard_quantize, silu_mul_quantize
from duo_qserve.model import PRESETS

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
CONTEXT = 1 << 20


def _inputs(m: int, k: int, copies: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (
            torch.randn(m, k, dtype=torch.float16, device="cuda"),
            torch.randn(m, k, dtype=torch.float16, device="cuda"),
        )
        for _ in range(copies)
    ]


def torch_hadamard(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transform as torch ops: SiLU*up, the blockwise Hadamard as a matrix product, then the quantization."""
    g = gate.float()
    return quantize_per_token(fast_hadamard(g * torch.sigmoid(g) * up.float()))


PATHS = {"fused": silu_mul_quantize, "hadamard": silu_mul_hadamard_quantize, "torch_hadamard": torch_hadamard}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m duo_qserve.bench.hadamard", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--chunk", type=int, default=32768, help="pre-fill chunk tokens (the engine's CUDA default)"
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    device, date, copy = gpu_header()
    rows = []
    for name in MODELS:
        k, layers = PRESETS[name]["intermediate_size"], PRESETS[name]["n_layers"]
        decode = _inputs(1, k, 64)
        step = {
            path: bench_graph([lambda g=g, u=u, f=f: f(g, u) for g, u in decode]) for path, f in PATHS.items()
        }
        prefill = _inputs(a.chunk, k, 1)[0]
        chunk = {path: bench(lambda x=prefill, f=f: f(*x)) for path, f in PATHS.items()}
        del prefill
        extra_step = (step["hadamard"] - step["fused"]) * layers
        extra_chunk = (chunk["hadamard"] - chunk["fused"]) * layers
        row = {
            "model": name, "intermediate_size": k, "hadamard_block": hadamard_block(k), "layers": layers,
            "decode_row_ms": step, "prefill_chunk_ms": chunk,
            "extra_ms_per_decode_step": extra_step, "extra_ms_per_prefill_chunk": extra_chunk,
            "extra_s_prefill_1m": extra_chunk * math.ceil(CONTEXT / a.chunk) / 1e3,
            "torch_hadamard_extra_ms_per_decode_step": (step["torch_hadamard"] - step["fused"]) * layers,
        }  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    write_result(a.out, "hadamard", device, date, copy, argv, {"chunk": a.chunk, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
