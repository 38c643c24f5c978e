"""The quantized-KV Triton kernels against their PyTorch references, run on CPU by the Triton interpreter.

``TRITON_INTERPRET=1`` and ``DUO_QSERVE_TRITON=1`` are set before triton or duo_qserve is imported, so the
dispatch runs the Triton path on CPU tensors; the references are monkeypatched to raise inside the dispatch,
so a silent fallback fails the test. The interpreter must be on before triton's first import (its standard
library is decorated then): when an earlier test module already imported triton, these tests run in a child
pytest process instead. Inputs are fp32, so the kernels compute in fp32 (numpy dots) and agree with the
reference to rounding: out within 2e-5 * max|ref| (a few ulps of accumulated fp32 error), lse within 1e-5;
quantize-on-write codes and fp16 scales/zeros are bit-identical.
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
from duo_qserve.kernels.kv_attention import QuantArena  # noqa: E402

OUT_TOL, LSE_TOL = 2e-5, 1e-5


def _kv(h: int, n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with per-channel offsets and spreads (what per-channel scales are for), values plain; no zeros."""
    k = torch.randn(h, n, d, generator=gen) * (torch.rand(1, 1, d, generator=gen) * 3 + 0.1)
    k += torch.randn(1, 1, d, generator=gen) * 2
    return k, torch.randn(h, n, d, generator=gen) + 0.1


def test_in_child_process_when_triton_was_imported_first():
    if IN_PROCESS:
        pytest.skip("this process runs the tests itself")
    run_in_interpreter_child(__file__)


@pytest.fixture
def no_reference(monkeypatch):
    if not IN_PROCESS:
        pytest.skip("triton was imported without the interpreter: runs in a child process")

    def boom(*args, **kwargs):
        raise AssertionError("the reference ran instead of the Triton path")

    monkeypatch.setattr(kv_attention, "reference", boom)
    monkeypatch.setattr(kv_quantize, "reference", boom)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group,d", [(32, 64), (64, 128)])
def test_quantize_kv_bit_exact(bits, group, d, no_reference):
    gen = torch.Generator().manual_seed(bits * group + d)
    k, v = _kv(2, 3 * group, d, gen)
    got = kv_quantize.quantize_kv(k, v, bits, group)
    want = (*kv_quantize.quantize_keys(k, bits, group), *kv_quantize.quantize_values(v, bits))
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


def test_quantize_kv_into_arena_slices(no_reference):
    """``out`` = strided slices of a bigger arena, as the cache holds them."""
    gen = torch.Generator().manual_seed(1)
    h, group, d, cap, n0 = 2, 32, 64, 160, 64
    k, v = _kv(h, 2 * group, d, gen)
    arena = (
        torch.zeros(h, cap, d // 2, dtype=torch.uint8),
        torch.zeros(h, cap // group, d, dtype=torch.float16),
        torch.zeros(h, cap // group, d, dtype=torch.float16),
        torch.zeros(h, cap, d // 2, dtype=torch.uint8),
        torch.zeros(h, cap, dtype=torch.float16),
        torch.zeros(h, cap, dtype=torch.float16),
    )
    g0, g1 = n0 // group, n0 // group + 2
    sl = (slice(n0, n0 + 2 * group), slice(g0, g1), slice(g0, g1)) + (slice(n0, n0 + 2 * group),) * 3
    kv_quantize.quantize_kv(k, v, 4, group, out=tuple(a[:, s] for a, s in zip(arena, sl, strict=True)))
    want = (*kv_quantize.quantize_keys(k, 4, group), *kv_quantize.quantize_values(v, 4))
    for a, s, w in zip(arena, sl, want, strict=True):
        assert torch.equal(a[:, s], w)
        assert not a[:, : s.start].any()  # nothing written outside the slice


def _cache(hkv: int, n_quant: int, d: int, bits: int, group: int, gen: torch.Generator) -> QuantArena:
    """An arena of capacity n_quant + group holding n_quant tokens (the rest garbage)."""
    k, v = _kv(hkv, n_quant + group, d, gen)
    codes = kv_quantize.quantize_keys(k, bits, group) + kv_quantize.quantize_values(v, bits)
    return QuantArena(*codes, n_quant, bits, group)


def _check(out, lse, ref_out, ref_lse, shape):
    assert out.shape == shape and out.dtype == torch.float32 and lse.shape == shape[:2]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out - ref_out).abs().max() <= OUT_TOL * ref_out.abs().max()
    assert (lse - ref_lse).abs().max() <= LSE_TOL * max(1.0, ref_lse.abs().max().item())


REFERENCE = kv_attention.reference
DECODE_CASES = [  # (bits, hkv, g, d, group, groups of n_quant, T): every shape at 4 bits, a subset at 8
    (bits, 2, g, d, group, k, t)
    for bits in (4, 8)
    for g, d in ((3, 64), (4, 128))
    for group in (32, 64)
    for k in ((1, 2, 3, 4, 5) if bits == 4 else (2,))
    for t in ((1, 2, 5) if bits == 4 else (1, 5))
    if bits == 4 or group == 32
]


@pytest.mark.parametrize("bits,hkv,g,d,group,k,t", DECODE_CASES)
def test_decode_matches_reference(bits, hkv, g, d, group, k, t, no_reference):
    gen = torch.Generator().manual_seed(hash((bits, g, d, group, k, t)) % 2**31)
    n_quant = group * k
    cache = _cache(hkv, n_quant, d, bits, group, gen)
    q = torch.randn(t, hkv * g, d, generator=gen)
    ref = REFERENCE(q, cache, d**-0.5)
    out, lse = kv_attention.quantized_prefix_attention(q, cache, d**-0.5)
    _check(out, lse, *ref, q.shape)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_split_counts(num_splits, no_reference):
    """One split writes the result directly; several go through the merge kernel (3 over 5 groups: uneven)."""
    gen = torch.Generator().manual_seed(num_splits)
    bits, hkv, g, d, group, n_quant = 4, 2, 4, 64, 32, 160
    cache = _cache(hkv, n_quant, d, bits, group, gen)
    q = torch.randn(2, hkv * g, d, generator=gen)
    ref = REFERENCE(q, cache, d**-0.5)
    out, lse = kv_attention.decode_attention(q, cache, d**-0.5, num_splits=num_splits)
    _check(out, lse, *ref, q.shape)


@pytest.mark.parametrize("hkv", range(1, 9))
def test_decode_splits_fill_one_wave(hkv):
    """Every retrieval-head count of a layer gets at most ``waves`` programs per SM (a few more would run as a
    second, nearly empty wave) and leaves fewer than one program per kv head of the wave unused."""
    q = torch.zeros(1, hkv * 4, 128)  # CPU: decode_splits counts 4 SMs
    codes = torch.zeros(hkv, 1 << 20, 64, dtype=torch.uint8)
    scales = torch.zeros(hkv, (1 << 20) // 128, 128)  # their shapes do not matter to the split count
    arena = QuantArena(codes, scales, scales, codes, scales, scales, 1 << 20, 4, 128)
    slots = int(kv_attention._program(4).waves * 4)  # default programs of a decode step's 4 rows per kv head
    splits = kv_attention.decode_splits(q, arena)
    assert slots - hkv < hkv * splits <= slots


@pytest.mark.parametrize("bits,g,d,group,k", [(4, 4, 64, 32, 5), (8, 3, 128, 64, 2)])
def test_prefill_matches_reference(bits, g, d, group, k, no_reference):
    """T = 33 > DECODE_MAX_T takes the slab path; a 2-group slab bound forces several slabs and merges."""
    gen = torch.Generator().manual_seed(bits + k)
    hkv, n_quant, t = 2, group * k, 33
    cache = _cache(hkv, n_quant, d, bits, group, gen)
    q = torch.randn(t, hkv * g, d, generator=gen)
    ref = REFERENCE(q, cache, d**-0.5)
    out, lse = kv_attention.quantized_prefix_attention(q, cache, d**-0.5)
    _check(out, lse, *ref, q.shape)
    slab = 2 * group * 2 * hkv * d * 4  # two groups of K+V in fp32
    out, lse = kv_attention.prefill_attention(q, cache, d**-0.5, slab_bytes=slab)
    _check(out, lse, *ref, q.shape)


def test_decode_of_a_head_size_the_code_kernel_does_not_take(no_reference):
    """head_dim 32 (sub-tiles of 8 channels, too narrow for the tensor cores' dots): one query goes through the slab
    path instead, with the same result."""
    gen = torch.Generator().manual_seed(32)
    bits, hkv, g, d, group, n_quant = 4, 2, 4, 32, 32, 96
    assert not kv_attention.code_kernel_fits(d) and kv_attention.code_kernel_fits(64)
    cache = _cache(hkv, n_quant, d, bits, group, gen)
    q = torch.randn(1, hkv * g, d, generator=gen)
    ref = REFERENCE(q, cache, d**-0.5)
    out, lse = kv_attention.quantized_prefix_attention(q, cache, d**-0.5)
    _check(out, lse, *ref, q.shape)


def test_head_size_no_kernel_takes_is_refused_clearly(no_reference):
    """head_dim 48 (not a power of two): a ValueError that names it, not a compiler error."""
    hkv, g, d, group, n = 2, 4, 48, 32, 64
    cache = QuantArena(
        torch.zeros(hkv, n, d // 2, dtype=torch.uint8), torch.ones(hkv, n // group, d), torch.zeros(hkv, n // group, d),
        torch.zeros(hkv, n, d // 2, dtype=torch.uint8), torch.ones(hkv, n), torch.zeros(hkv, n), n, 4, group,
    )  # fmt: skip
    with pytest.raises(ValueError, match="head_dim 48"):
        kv_attention.quantized_prefix_attention(torch.randn(1, hkv * g, d), cache, d**-0.5)


def test_fused_code_kernel_many_row_tiles(no_reference):
    """The code kernel with several row tiles (how it would run a pre-fill chunk)."""
    gen = torch.Generator().manual_seed(7)
    bits, hkv, g, d, group, n_quant, t = 4, 2, 3, 64, 32, 96, 33
    cache = _cache(hkv, n_quant, d, bits, group, gen)
    q = torch.randn(t, hkv * g, d, generator=gen)
    ref = REFERENCE(q, cache, d**-0.5)
    out, lse = kv_attention.decode_attention(q, cache, d**-0.5, block_m=32)
    _check(out, lse, *ref, q.shape)


def test_empty_prefix(no_reference):
    cache = _cache(2, 0, 64, 4, 32, torch.Generator().manual_seed(0))
    q = torch.randn(1, 8, 64)
    out, lse = kv_attention.quantized_prefix_attention(q, cache, 0.125)
    assert not out.any() and torch.isneginf(lse).all()
