"""Query groups that are not powers of two (Qwen2.5-Coder: 7 query heads per KV head at 0.5B, 6 at 1.5B) through
the quantized-KV kernels, against their torch references in Triton's interpreter (the fused decode step's cases
for these groups are in ``test_decode_graph.STEP_CASES``).

As in ``test_kv_kernels``: the interpreter must be on before triton's first import, so when an earlier module
imported triton these tests run in a child pytest process. Inputs are fp32; the same bounds as there: out within
2e-5 * max|ref| (accumulated fp32 rounding), lse within 1e-5.
"""

from __future__ import annotations

import os
import sys

# in process unless triton was imported first without the interpreter (conftest imports the model, which imports
# the kernels): a child started by run_in_interpreter_child has it on from the start and runs the tests itself
IN_PROCESS = "triton" not in sys.modules or bool(sys.modules["triton"].knobs.runtime.interpret)
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["DUO_QSERVE_TRITON"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import run_in_interpreter_child  # noqa: E402

from duo_qserve.kernels import kv_attention, kv_quantize  # noqa: E402

OUT_TOL, LSE_TOL = 2e-5, 1e-5
QWEN_GROUPS = [(7, 64), (6, 128)]  # (q_per_kv, head_dim): Qwen2.5-Coder 0.5B and 1.5B


def test_in_child_process_when_triton_was_imported_first():
    if IN_PROCESS:
        pytest.skip("this process runs the tests itself")
    run_in_interpreter_child(__file__)


@pytest.fixture
def interpreted():
    if not IN_PROCESS:
        pytest.skip("triton was imported without the interpreter: runs in a child process")


def _check(out, lse, ref_out, ref_lse):
    assert out.shape == ref_out.shape and torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out - ref_out).abs().max() <= OUT_TOL * ref_out.abs().max()
    assert (lse - ref_lse).abs().max() <= LSE_TOL * max(1.0, ref_lse.abs().max().item())


@pytest.mark.parametrize("g,d", QWEN_GROUPS)
@pytest.mark.parametrize("t", [1, 2, 33])  # decode steps, a short question, a pre-fill chunk (the slab path)
def test_quantized_prefix_attention_with_qwen_groups(g, d, t, interpreted):
    gen = torch.Generator().manual_seed(g * 100 + t)
    hkv, bits, group, n_quant = 2, 4, 32, 96
    k, v = (
        torch.randn(hkv, n_quant + group, d, generator=gen),
        torch.randn(hkv, n_quant + group, d, generator=gen),
    )
    codes = kv_quantize.quantize_keys(k, bits, group) + kv_quantize.quantize_values(v, bits)
    cache = kv_attention.QuantArena(*codes, n_quant, bits, group)
    q = torch.randn(t, hkv * g, d, generator=gen)
    ref = kv_attention.reference(q, cache, d**-0.5)
    _check(*kv_attention.quantized_prefix_attention(q, cache, d**-0.5), *ref)
    if t == 1:  # the split-K kernel with several splits and the merge kernel
        _check(*kv_attention.decode_attention(q, cache, d**-0.5, num_splits=3), *ref)
