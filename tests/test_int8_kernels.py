"""The W8A8 Triton kernels against their PyTorch references.

On CPU the kernels run under the Triton interpreter. ``TRITON_INTERPRET=1`` must be set before ``triton`` is
first imported and must stay set, so the kernels run in a child process (this file run as a script) on inputs
made here; the parent computes the references and compares. ``backend="triton"`` refuses CPU tensors unless
the kernels were decorated for the interpreter, so the child cannot silently fall back to the reference.
On a CUDA machine the same cases also run on the GPU in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import skip_if_interpreter_broken

from duo_qserve import kernels
from duo_qserve.kernels import int8_gemm, quantize_act

ROOT = Path(__file__).resolve().parents[1]

# (M, N, K): the M=1 GEMV (K a multiple of 4; partial row and K tiles), M=1 with odd K (the 16-row tile path),
# decode (M <= 16) and pre-fill tiles, odd sizes that leave partial tiles on every axis.
GEMM_SHAPES = [
    (1, 97, 160),
    (1, 64, 162),
    (3, 96, 160),
    (16, 96, 160),
    (17, 64, 128),
    (33, 96, 160),
    (130, 300, 288),
]
# Row shapes for the quantization kernels; the last one has leading dims [2, 5].
ROW_SHAPES = [(1, 160), (3, 96), (33, 4096), (2, 5, 100)]
EPS = 1e-5


def _nonzero_int8(*shape: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randint(1, 128, shape, generator=gen, dtype=torch.int32)
    sign = torch.randint(0, 2, shape, generator=gen, dtype=torch.int32) * 2 - 1
    return (q * sign).to(torch.int8)


def make_cases() -> dict[str, tuple]:
    """name -> (function name, positional args, keyword args), deterministic."""
    gen = torch.Generator().manual_seed(0)
    cases: dict[str, tuple] = {}
    for m, n, k in GEMM_SHAPES:
        args = (
            _nonzero_int8(m, k, gen=gen), torch.rand(m, 1, generator=gen) + 0.01,
            _nonzero_int8(n, k, gen=gen), torch.rand(n, generator=gen) + 0.01,
        )  # fmt: skip
        cases[f"gemm-{m}x{n}x{k}-fp32"] = ("w8a8_matmul", args, {"out_dtype": torch.float32})
    # Grouped GEMV (q/k/v, gate/up): three weights in one launch, four in two; M = 3 takes one product each.
    k = 160
    x = (_nonzero_int8(1, k, gen=gen), torch.rand(1, 1, generator=gen) + 0.01)
    weights = [(_nonzero_int8(n, k, gen=gen), torch.rand(n, generator=gen) + 0.01) for n in (97, 64, 33, 16)]
    cases["group-1x(97,64,33)"] = ("w8a8_matmul_group", (*x, weights[:3]), {"out_dtype": torch.float32})
    cases["group-1x(97,64,33,16)"] = ("w8a8_matmul_group", (*x, weights), {"out_dtype": torch.float32})
    x3 = (_nonzero_int8(3, k, gen=gen), torch.rand(3, 1, generator=gen) + 0.01)
    cases["group-3x(97,64)"] = ("w8a8_matmul_group", (*x3, weights[:2]), {"out_dtype": torch.float32})
    # Biases in the epilogue (Qwen2's q/k/v): the grouped GEMV, its M = 3 fallback, and each tile path.
    # x scales shrunk so products are a few tens, the size of the biases: a bias left out cannot hide in rtol.
    biases = [torch.randn(n, generator=gen) * 30 for n in (97, 64, 33, 16)]
    for name, (x_q, x_scale), n_weights in (("1x(97,64,33,16)", x, 4), ("3x(97,64)", x3, 2)):
        cases[f"group-{name}-bias"] = (
            "w8a8_matmul_group", (x_q, x_scale / 1e3, weights[:n_weights]),
            {"out_dtype": torch.float32, "biases": biases[:n_weights]},
        )  # fmt: skip
    for m, n, k in (GEMM_SHAPES[0], GEMM_SHAPES[2], GEMM_SHAPES[5]):
        bias = (torch.randn(n, generator=gen) * 30).half()
        x_q, x_scale, w_q, w_scale = cases[f"gemm-{m}x{n}x{k}-fp32"][1]
        cases[f"gemm-{m}x{n}x{k}-bias-fp16"] = (
            "w8a8_matmul", (x_q, x_scale / 1e3, w_q, w_scale), {"out_dtype": torch.float16, "bias": bias}
        )  # fmt: skip
    # The residual add of o_proj/down_proj, in the GEMV's and the tiles' epilogue.
    for m, n, k in (GEMM_SHAPES[0], GEMM_SHAPES[5]):
        x_q, x_scale, w_q, w_scale = cases[f"gemm-{m}x{n}x{k}-fp32"][1]
        args = (x_q, x_scale / 1e3, w_q, w_scale)  # products of a few tens: no fp16 overflow
        for dtype in (torch.float32, torch.float16):
            res = (torch.randn(m, n, generator=gen) * 30).to(dtype)
            name = f"gemm-{m}x{n}x{k}-residual-{str(dtype).removeprefix('torch.')}"
            cases[name] = ("w8a8_matmul", args, {"out_dtype": dtype, "residual": res})
    m, n, k = GEMM_SHAPES[5]
    cases[f"gemm-{m}x{n}x{k}-fp16"] = (
        "w8a8_matmul",
        cases[f"gemm-{m}x{n}x{k}-fp32"][1],
        {"out_dtype": torch.float16},
    )
    for shape in ROW_SHAPES:
        for dtype in (torch.float32, torch.float16):
            x = (torch.randn(shape, generator=gen) * 3).to(dtype)
            # gate/up as halves of one wider row: strided inputs, as a fused gate_up projection produces.
            gate_up = (torch.randn(*shape[:-1], 2 * shape[-1], generator=gen) * 2).to(dtype)
            gate, up = gate_up[..., : shape[-1]], gate_up[..., shape[-1] :]
            weight = torch.rand(shape[-1], generator=gen) + 0.5
            tag = f"{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"
            cases[f"quantize_per_token-{tag}"] = ("quantize_per_token", (x,), {})
            cases[f"rmsnorm_quantize-{tag}"] = ("rmsnorm_quantize", (x, weight, EPS), {})
            cases[f"silu_mul_quantize-{tag}"] = ("silu_mul_quantize", (gate, up), {})
            # Hadamard blocks of 32 (x5, x3: padded to 8 and 4 blocks), 4096 (one block) and 4 (x25).
            cases[f"silu_mul_hadamard_quantize-{tag}"] = ("silu_mul_hadamard_quantize", (gate, up), {})
    return cases


def _function(name: str):
    return getattr(int8_gemm if name.startswith("w8a8") else quantize_act, name)


def _group_reference(x_q, x_scale, weights, out_dtype, biases=None):
    each = biases or [None] * len(weights)
    return [
        int8_gemm.reference(x_q, x_scale, w_q, w_scale, out_dtype, bias=b)
        for (w_q, w_scale), b in zip(weights, each, strict=True)
    ]


def _reference(name: str):
    if name.startswith("w8a8"):
        return int8_gemm.reference if name == "w8a8_matmul" else _group_reference
    return getattr(quantize_act, f"{name}_reference")


def _to(t, device: str):
    if isinstance(t, (list, tuple)):
        return type(t)(_to(x, device) for x in t)
    return t.to(device) if isinstance(t, torch.Tensor) else t


def run_cases(cases: dict[str, tuple], device: str) -> dict[str, object]:
    out = {}
    for name, (fn, args, kwargs) in cases.items():
        res = _function(fn)(
            *_to(args, device), **{k: _to(v, device) for k, v in kwargs.items()}, backend="triton"
        )
        out[name] = _to(res, "cpu")
    return out


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple]:
    return make_cases()


@pytest.fixture(scope="module")
def interpreted(cases, tmp_path_factory) -> dict[str, object]:
    """The Triton kernels' outputs, computed by the interpreter in a child process."""
    d = tmp_path_factory.mktemp("interp")
    torch.save(cases, d / "cases.pt")
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    skip_if_interpreter_broken(env)
    proc = subprocess.run(
        [sys.executable, __file__, str(d / "cases.pt"), str(d / "out.pt")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return torch.load(d / "out.pt", weights_only=True)


def check(name: str, case: tuple, got) -> None:
    fn, args, kwargs = case
    want = _reference(fn)(*args, **kwargs)
    if fn.startswith("w8a8"):
        # Exact integer accumulation on both sides: only the fp32 epilogue rounds (int32->fp32, 2 products, the
        # residual's sum), so the error is relative to the terms, which a residual can nearly cancel.
        rtol = 1e-5 if kwargs["out_dtype"] == torch.float32 else 2e-3
        res = kwargs.get("residual")
        terms = 0.0 if res is None else (want.double() - res.double()).abs() + res.double().abs()
        got, want = (got, want) if isinstance(want, list) else ([got], [want])
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            err = torch.where(g == w, 0.0, (g.double() - w.double()).abs())  # equal infinities too
            assert (err <= rtol * (w.double().abs() + terms) + 1e-6).all(), f"{name}: max error {err.max()}"
        return
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == torch.int8 and q.shape == q_ref.shape and s.shape == s_ref.shape == (*q.shape[:-1], 1)
    # Same fp32 operations, different summation order (and rsqrt/division approximations on GPUs): the scale
    # matches to fp32 rounding; a code may move by one step where y*127/absmax lies within an ulp of a .5 tie.
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01, (
        f"{name}: {int((diff > 0).sum())} codes differ"
    )
    assert q.abs().max() == 127  # the row maximum maps to +-127


@pytest.mark.parametrize("name", list(make_cases()))
def test_interpreted_kernel_matches_reference(name, cases, interpreted):
    check(name, cases[name], interpreted[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_match_reference(cases):
    got = run_cases(cases, "cuda")
    for name, case in cases.items():
        check(name, case, got[name])


def test_triton_backend_refuses_cpu_without_interpreter():
    if kernels.INTERPRETED:
        pytest.skip("this process runs under TRITON_INTERPRET=1")
    x = torch.ones(2, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        int8_gemm.w8a8_matmul(x, torch.ones(2, 1), x, torch.ones(2), backend="triton")


def test_gemm_checks_shapes():
    x, w = torch.ones(4, 32, dtype=torch.int8), torch.ones(8, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match="disagree on K"):
        int8_gemm.w8a8_matmul(x, torch.ones(4, 1), w, torch.ones(8))


if __name__ == "__main__":  # the interpreter child: python tests/test_int8_kernels.py CASES OUT
    assert kernels.INTERPRETED, "run with TRITON_INTERPRET=1"
    torch.save(run_cases(torch.load(sys.argv[1], weights_only=True), "cpu"), sys.argv[2])
