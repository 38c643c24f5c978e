"""The graph-safe decode step (``duo_qserve.decode_graph``) against the eager step, on CPU.

The CUDA graph itself needs a GPU; what it replays is the graph-safe step, run here eagerly: the fused step kernels
(``duo_qserve.kernels.decode_step``: RoPE, fp tail / sink + ring attention and cache writes, device-length split-K
code kernel, merge; Triton interpreter) or their torch reference, and host-side quantization of a filled tail.
Like ``test_kv_kernels``, the interpreter must be on before triton's first import, so when another module imported
triton first these tests run in a child pytest process. Inputs are fp32: the fused step agrees with its reference
to 2e-5 * max|ref| (accumulated fp32 rounding), and writes the same cache slots bit for bit.
"""

from __future__ import annotations

import copy
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
from conftest import (  # noqa: E402
    random_cache_pair,
    run_in_interpreter_child,
    tiny_args,
    tiny_model,
)

from duo_qserve.cache import CacheConfig, CacheSpec, DuoKVCache  # noqa: E402
from duo_qserve.decode_graph import GraphedDecoder  # noqa: E402
from duo_qserve.kernels import decode_step, kv_attention, kv_quantize  # noqa: E402
from duo_qserve.kernels.attention import reference as dense_reference  # noqa: E402
from duo_qserve.kernels.decode_step import masked_attention  # noqa: E402
from duo_qserve.model import ModelArgs, rope_cos_sin, rope_inv_freq  # noqa: E402

OUT_TOL = 2e-5


def test_in_child_process_when_triton_was_imported_first():
    if IN_PROCESS:
        pytest.skip("this process runs the tests itself")
    run_in_interpreter_child(__file__)


@pytest.fixture
def interpreted():
    if not IN_PROCESS:
        pytest.skip("triton was imported without the interpreter: runs in a child process")


@pytest.mark.parametrize("n_valid", [0, 1, 5, 16])
def test_masked_attention_equals_dense_over_the_valid_slots(n_valid, interpreted):
    gen = torch.Generator().manual_seed(n_valid)
    q = torch.randn(1, 6, 16, generator=gen)
    k, v = torch.randn(2, 16, 16, generator=gen), torch.randn(2, 16, 16, generator=gen)
    out, lse = masked_attention(q, k, v, torch.tensor([n_valid]), 0.25)
    if n_valid == 0:
        assert not out.any() and torch.isneginf(lse).all()
        return
    ref_out, ref_lse = dense_reference(q, k[:, :n_valid], v[:, :n_valid], n_valid, 0.25)
    assert (out - ref_out).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5


@pytest.mark.parametrize("num_splits", [None, 1, 3, 7])
@pytest.mark.parametrize("groups", [0, 1, 3, 5])
def test_decode_kernel_with_device_length(groups, num_splits, interpreted):
    """The grid is sized for the whole arena (6 groups); the kernel reads n_quant from the device: splits past
    it are empty, and n_quant = 0 gives zeros and lse = -inf."""
    gen = torch.Generator().manual_seed(groups)
    bits, hkv, g, d, group, cap = 4, 2, 4, 64, 32, 192
    k, v = torch.randn(hkv, cap, d, generator=gen), torch.randn(hkv, cap, d, generator=gen)
    codes = kv_quantize.quantize_keys(k, bits, group) + kv_quantize.quantize_values(v, bits)
    q = torch.randn(1, hkv * g, d, generator=gen)
    n = torch.tensor([groups * group], dtype=torch.int32)
    arena = kv_attention.QuantArena(*codes, n, bits, group)
    out, lse = kv_attention.decode_attention(q, arena, d**-0.5, num_splits=num_splits)
    if groups == 0:
        assert not out.any() and torch.isneginf(lse).all()
        return
    ref_out, ref_lse = kv_attention.reference(q, arena._replace(n_quant=groups * group), d**-0.5)
    assert (out - ref_out).abs().max() <= 2e-5 * ref_out.abs().max()
    assert (lse - ref_lse).abs().max() <= 1e-5 * ref_lse.abs().max()


STEP_CASES = [  # (hkv, g, n_retrieval, d, group, sink, recent, pos)
    (2, 3, 1, 64, 32, 4, 40, 95),  # tail slot 31 (the group's last), ring slot 11
    (2, 3, 1, 64, 32, 4, 40, 72),  # ring slot 28: sink + ring = 32, the first slot of the second chunk
    (2, 3, 1, 64, 32, 4, 40, 83),  # ring slot 39 (the ring's last)
    (2, 3, 1, 64, 32, 4, 40, 64),  # tail slot 0: only the new token in the tail
    (2, 3, 1, 64, 32, 4, 40, 20),  # n_quant = 0: nothing quantized yet
    (3, 3, 0, 16, 16, 4, 40, 50),  # streaming heads only
    (3, 3, 3, 64, 16, 4, 40, 50),  # retrieval heads only
    (2, 4, 1, 128, 32, 0, 40, 75),  # no sinks, G = 4, D = 128
    *[(2, 7, n_r, 64, 32, 4, 40, 95) for n_r in (0, 1, 2)],  # Qwen2.5-Coder-0.5B's 7 query heads per KV head
    *[(2, 6, n_r, 128, 32, 4, 40, 95) for n_r in (0, 1, 2)],  # and the 1.5B's 6: groups not a power of two
]


@pytest.mark.parametrize("hkv,g,n_retrieval,d,group,sink,recent,pos", STEP_CASES)
@pytest.mark.parametrize("bits", [4, 8])
def test_fused_step_equals_reference(hkv, g, n_retrieval, d, group, sink, recent, pos, bits, interpreted):
    """Output and lse within OUT_TOL of the torch reference; every cache tensor afterwards equal (the new k/v in
    the tail or ring slot, nothing else touched)."""
    _fused_against_reference(hkv, g, n_retrieval, d, group, sink, recent, pos, bits, keep=1)


@pytest.mark.parametrize("hkv,g,n_retrieval,d,group,sink,recent,pos", STEP_CASES[:5] + STEP_CASES[6:7])
def test_fused_step_without_the_new_token_equals_reference(
    hkv, g, n_retrieval, d, group, sink, recent, pos, interpreted
):  # fmt: skip
    """``keep = 0`` (another rank of a context-parallel cache holds the new token): the retrieval heads attend
    their held slots only, whatever the new k/v, and their tail is left as it was; streaming heads as before."""
    _fused_against_reference(hkv, g, n_retrieval, d, group, sink, recent, pos, 4, keep=0)


def _fused_against_reference(hkv, g, n_retrieval, d, group, sink, recent, pos, bits, keep):
    gen = torch.Generator().manual_seed(hash((hkv, g, n_retrieval, d, pos, bits)) % 2**31)
    args = ModelArgs(vocab_size=8, dim=hkv * g * d, n_layers=1, n_heads=hkv * g, n_kv_heads=hkv, head_dim=d,
                     intermediate_size=8, rope_theta=500.0)  # fmt: skip
    config = CacheConfig(kv_bits=bits, key_group=group, sink_tokens=sink, recent_tokens=recent)
    spec = CacheSpec(args, [n_retrieval], config, 4 * group, torch.float32)
    want_cache, got_cache = random_cache_pair(spec, gen)
    want_layer, got_layer = want_cache.layers[0], got_cache.layers[0]
    before = {name: t.clone() for name, t in want_layer.items()}
    q = torch.randn(1, hkv * g, d, generator=gen)
    k, v = torch.randn(1, hkv, d, generator=gen), torch.randn(1, hkv, d, generator=gen)
    rope = rope_cos_sin(rope_inv_freq(args), torch.tensor([pos]))
    p = torch.tensor([pos])
    slots = decode_step.StepSlots(p % group, torch.full_like(p, keep), (p - sink) % recent)
    tail, ring = slots.tail, slots.ring
    n_quant = (p - tail).to(torch.int32)
    want, want_lse = decode_step.reference(q, k, v, rope, want_cache.step_layer(0, n_quant), slots, d**-0.5)
    got, got_lse = decode_step.fused(q, k, v, rope, got_cache.step_layer(0, n_quant), slots, d**-0.5)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got - want).abs().max() <= OUT_TOL * want.abs().max()
    assert (got_lse - want_lse).abs().max() <= OUT_TOL * want_lse.abs().max()
    for name, t in want_layer.items():
        assert torch.equal(got_layer[name], t), name
        changed = (t != before[name]).flatten(2).any(-1) if t.dim() == 3 else (t != before[name])
        if name in ("k_tail", "v_tail") and not keep:
            assert not changed.any(), name
        elif name in ("k_tail", "v_tail", "ring_k", "ring_v"):  # exactly the new token's slot, per head
            slot = int(tail if name.endswith("tail") else ring)
            assert changed[:, slot].all() and changed.sum() == changed.shape[0], name
        else:
            assert not changed.any(), name
    if not keep:  # the new k/v reach only the streaming heads
        for name, t in got_layer.items():
            t.copy_(before[name])
        other, _ = decode_step.fused(q, k * 2, v * 2, rope, got_cache.step_layer(0, n_quant), slots, d**-0.5)
        assert torch.equal(other[:, : n_retrieval * g], got[:, : n_retrieval * g])


def test_merge_skips_code_splits_of_heads_without_them(interpreted):
    """Splits below ``code_splits`` count for kv heads below ``code_heads`` only: garbage there is ignored."""
    gen = torch.Generator().manual_seed(0)
    hkv, n_splits, g, d, code_splits, code_heads = 3, 5, 3, 16, 2, 1
    po = torch.randn(hkv, n_splits, g, d, generator=gen)
    plse = torch.randn(hkv, n_splits, g, generator=gen)
    out = torch.empty(1, hkv * g, d)
    lse = torch.empty(1, hkv * g)
    kv_attention.merge_partials(po, plse, out, lse, code_splits, code_heads)
    for h in range(hkv):
        first = 0 if h < code_heads else code_splits
        w = torch.softmax(plse[h, first:], dim=0)  # [S', G]
        want = (w[..., None] * po[h, first:]).sum(0)
        assert (out[0, h * g : (h + 1) * g] - want).abs().max() <= OUT_TOL * want.abs().max()
        assert torch.allclose(lse[0, h * g : (h + 1) * g], torch.logsumexp(plse[h, first:], 0), atol=1e-5)


def _pair(
    bits: int, n_retrieval: list[int], group: int, sink: int, recent: int, max_tokens: int, head_dim: int = 64
):  # fmt: skip
    """A tiny model and two empty caches; head_dim 64, the smallest the GPU's code kernel takes."""
    args = tiny_args(head_dim=head_dim)
    model = tiny_model(args)
    config = CacheConfig(kv_bits=bits, key_group=group, sink_tokens=sink, recent_tokens=recent)
    spec = CacheSpec(args, n_retrieval, config, max_tokens, torch.float32)
    return args, model, DuoKVCache(spec, "cpu"), DuoKVCache(spec, "cpu")


def _copy_cache(src: DuoKVCache, dst: DuoKVCache) -> None:
    """dst := src (tensors cast to dst's dtypes: fp32 -> fp64 is exact; codes and fp16 scales are copied as is)."""
    for a, b in zip(src.layers, dst.layers, strict=True):
        for name in a:
            b[name].copy_(a[name])
    dst.seq_len = src.seq_len


FP32_EPS = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("triton", [True, False])
@pytest.mark.parametrize(
    "bits,n_retrieval", [(4, [1, 2]), (8, [1, 0]), (4, [2, 2])]
)  # mixed, one all-streaming layer, no streaming heads
@torch.no_grad()
def test_graph_safe_step_equals_eager_step(bits, n_retrieval, triton, interpreted, monkeypatch):
    """Pre-fill, then decode token by token across several key-group boundaries and ring wraps. Each step starts
    the graph-safe step, the eager step and a float64 eager step from one cache state: carried over many steps,
    a key one rounding error from a code boundary flips a 4-bit code in one path only, which moves later logits
    by far more than any rounding (seen as 2.2e-4 on one machine). Per step, then:
    - logits: the graph-safe step is at most 4x as far from the float64 step as the eager fp32 step is, plus
      64 fp32 ulps of the largest logit (the two fp32 paths sum in different orders over at most ~100 terms);
    - the new token's fp key/value slots agree to 16 fp32 ulps of their magnitude;
    - a group quantized by the graph-safe step has exactly the codes, scales and zeros that the reference
      quantizer gives for that step's own fp keys and values."""
    if not triton:
        monkeypatch.setenv("DUO_QSERVE_TRITON", "0")  # the CPU reference paths
    group, sink, recent = 16, 4, 8
    args, model, eager, graphed = _pair(bits, n_retrieval, group, sink, recent, 120)
    model64 = copy.deepcopy(model).double()
    exact = DuoKVCache(CacheSpec(args, n_retrieval, eager.config, 120, torch.float64), "cpu")
    ids = torch.randint(0, args.vocab_size, (100,), generator=torch.Generator().manual_seed(bits))
    prompt = 5  # shorter than sink + recent: the decoder starts on the eager fallback
    model(ids[:prompt], eager)
    decoder = GraphedDecoder(model, graphed, use_graph=False)
    worst_ratio = 0.0
    for i in range(prompt, len(ids)):
        _copy_cache(eager, graphed)
        _copy_cache(eager, exact)
        with monkeypatch.context() as m:
            m.setenv("DUO_QSERVE_TRITON", "0")  # float64 through the torch references
            ref = model64(ids[i : i + 1], exact, last_only=True).double()
        want = model(ids[i : i + 1], eager, last_only=True)
        got = decoder.step(int(ids[i]))
        assert eager.seq_len == graphed.seq_len == i + 1
        eager_err = (want.double() - ref).abs().max().item()
        bound = 4 * eager_err + 64 * FP32_EPS * ref.abs().max().item()
        got_err = (got.double() - ref).abs().max().item()
        assert got_err <= bound, (i, got_err, eager_err)
        worst_ratio = max(worst_ratio, got_err / bound)
        for layer, (a, b) in enumerate(zip(eager.layers, graphed.layers, strict=True)):
            pos, n_r = i, n_retrieval[layer]
            if n_r and graphed.seq_len % group:  # the new token waits in the fp tail
                slot = pos % group
                for name in ("k_tail", "v_tail"):
                    x, y = a[name][:n_r, slot], b[name][:n_r, slot]
                    assert (x - y).abs().max() <= 16 * FP32_EPS * max(x.abs().max(), 1.0), (i, name)
            elif n_r:  # the tail just filled: the graph-safe step quantized it from its own fp values
                n_quant = graphed.seq_len - group
                codes = kv_quantize.reference(b["k_tail"][:n_r], b["v_tail"][:n_r], bits, group)
                names = ("k_data", "k_scale", "k_zero", "v_data", "v_scale", "v_zero")
                g0 = n_quant // group
                for name, want_t in zip(names, codes, strict=True):
                    lo, hi = (g0, g0 + 1) if name in ("k_scale", "k_zero") else (n_quant, n_quant + group)
                    assert torch.equal(b[name][:n_r, lo:hi], want_t), (i, name)
            if n_r < args.n_kv_heads and pos >= sink:  # streaming heads: the ring slot of the new token
                slot = (pos - sink) % recent
                for name in ("ring_k", "ring_v"):
                    x, y = a[name][:, slot], b[name][:, slot]
                    assert (x - y).abs().max() <= 16 * FP32_EPS * max(x.abs().max(), 1.0), (i, name)
    assert worst_ratio > 0  # the comparison saw rounding, so the bound was exercised


def test_fallbacks():
    args, model, cache, _ = _pair(16, [2, 1], 16, 4, 8, 64)
    assert not GraphedDecoder(model, cache, use_graph=False).supported()  # fp16 retrieval heads
    args, model, cache, _ = _pair(4, [2, 1], 16, 4, 8, 64)
    decoder = GraphedDecoder(model, cache, use_graph=False)
    cache.seq_len = 11
    assert not decoder.supported()  # ring not full yet
    cache.seq_len = 12
    assert decoder.supported()
    args, model, cache, _ = _pair(4, [2, 1], 16, 4, 8, 64, head_dim=16)
    cache.seq_len = 12
    assert not GraphedDecoder(model, cache, use_graph=False).supported()  # too narrow for the code kernel
