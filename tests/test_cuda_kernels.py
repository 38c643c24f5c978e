"""The decode step's Triton kernels compiled for a GPU, against their torch references.

Needs CUDA and a Triton that compiles (on a CPU these kernels run under the interpreter in ``test_decode_graph`` and
``test_kv_kernels``). Inputs are fp16, as served: the fused step (RoPE, fp tail / sinks + ring, the split-K code
kernel over the quantized prefix, the merge) agrees with the reference to 3e-3 of its largest output (q, p and
codes meet the tensor cores in fp16), and writes the same cache slots.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_cache_pair

from duo_qserve import kernels
from duo_qserve.cache import CacheConfig, CacheSpec
from duo_qserve.kernels import decode_step, kv_attention, kv_quantize
from duo_qserve.model import ModelArgs, rope_cos_sin, rope_inv_freq

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.INTERPRETED,
    reason="needs a CUDA GPU and Triton compiling, not interpreting",
)
TOL = 3e-3

CASES = [  # (hkv, g, n_retrieval, d, group, sink, recent, pos)
    (2, 3, 1, 64, 32, 4, 40, 95),  # G = 3: query rows padded
    (2, 4, 1, 128, 32, 0, 40, 75),  # no sinks
    (8, 4, 4, 128, 128, 128, 256, 5000),  # Llama-3-8B shapes, several splits
    (8, 4, 5, 128, 128, 128, 256, 70000),  # 5 retrieval heads (the split count rounds down)
    (8, 4, 8, 128, 128, 128, 256, 4095),  # retrieval heads only, the tail's last slot
]


@pytest.mark.parametrize("hkv,g,n_retrieval,d,group,sink,recent,pos", CASES)
@pytest.mark.parametrize("bits", [4, 8])
def test_fused_step_matches_reference_on_gpu(hkv, g, n_retrieval, d, group, sink, recent, pos, bits):
    gen = torch.Generator().manual_seed(pos + bits)
    args = ModelArgs(vocab_size=8, dim=hkv * g * d, n_layers=1, n_heads=hkv * g, n_kv_heads=hkv, head_dim=d,
                     intermediate_size=8, rope_theta=500000.0)  # fmt: skip
    config = CacheConfig(kv_bits=bits, key_group=group, sink_tokens=sink, recent_tokens=recent)
    spec = CacheSpec(args, [n_retrieval], config, (pos // group + 2) * group, torch.float16)
    want_cache, got_cache = random_cache_pair(spec, gen, "cuda")
    q = torch.randn(1, hkv * g, d, generator=gen).to("cuda", torch.float16)
    k, v = (torch.randn(1, hkv, d, generator=gen).to("cuda", torch.float16) for _ in range(2))
    rope = tuple(t.cuda() for t in rope_cos_sin(rope_inv_freq(args), torch.tensor([pos])))
    p = torch.tensor([pos], device="cuda")
    slots = decode_step.StepSlots(p % group, torch.ones_like(p), (p - sink) % recent)
    n_quant = (p - slots.tail).to(torch.int32)
    want = decode_step.reference(q, k, v, rope, want_cache.step_layer(0, n_quant), slots, d**-0.5)[0].float()
    got = decode_step.fused(q, k, v, rope, got_cache.step_layer(0, n_quant), slots, d**-0.5)[0].float()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= TOL * want.abs().max()
    # The new k/v went into the same slots: rotated with and without FMA contraction, so equal to fp16 rounding.
    for name, t in want_cache.layers[0].items():
        assert torch.allclose(got_cache.layers[0][name].float(), t.float(), rtol=1e-3, atol=1e-3), name


@pytest.mark.parametrize("t", [1, 4, 16])
def test_code_kernel_matches_reference_on_gpu(t):
    """The split-K code kernel alone (host length), 1 to 16 queries: row tiles of 4 to 64 query rows."""
    gen = torch.Generator().manual_seed(t)
    hkv, g, d, group, n = 4, 4, 128, 128, 8192
    cache = (
        torch.randint(0, 256, (hkv, n, d // 2), generator=gen, dtype=torch.uint8),
        torch.rand(hkv, n // group, d, generator=gen) * 0.2 + 0.01,
        torch.randn(hkv, n // group, d, generator=gen),
        torch.randint(0, 256, (hkv, n, d // 2), generator=gen, dtype=torch.uint8),
        torch.rand(hkv, n, generator=gen) * 0.2 + 0.01,
        torch.randn(hkv, n, generator=gen),
    )
    cache = tuple(x.cuda() if x.dtype == torch.uint8 else x.to("cuda", torch.float16) for x in cache)
    cache = kv_attention.QuantArena(*cache, n, 4, group)
    q = torch.randn(t, hkv * g, d, generator=gen).to("cuda", torch.float16)
    want_out, want_lse = kv_attention.reference(q.float(), cache, d**-0.5)
    out, lse = kv_attention.decode_attention(q, cache, d**-0.5)
    assert (out.float() - want_out).abs().max() <= TOL * want_out.abs().max()
    assert (lse - want_lse).abs().max() <= 2e-3


def test_code_kernel_one_split_over_long_context():
    """One program over 256K tokens of keys/values from ``quantize_kv`` (random queries spread the attention over
    all of them, and the values' zeros nearly cancel their codes' share): the per-block sums must not lose
    precision as they accumulate (accumulated in the tensor cores this measured 4e-2 of the largest output)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    hkv, g, d, group, n = 4, 4, 128, 128, 256 << 10
    k = torch.randn(hkv, n, d, device="cuda", generator=gen, dtype=torch.float16) * 2 + 0.5
    v = torch.randn(hkv, n, d, device="cuda", generator=gen, dtype=torch.float16)
    cache = kv_attention.QuantArena(*kv_quantize.quantize_kv(k, v, 4, group), n, 4, group)
    q = torch.randn(1, hkv * g, d, device="cuda", generator=gen, dtype=torch.float16)
    want_out, want_lse = kv_attention.reference(q.float(), cache, d**-0.5)
    out, lse = kv_attention.decode_attention(q, cache, d**-0.5, num_splits=1)
    assert (out.float() - want_out).abs().max() <= TOL * want_out.abs().max()
    assert (lse - want_lse).abs().max() <= 2e-3
