"""The graph-safe decode step (``duo_qserve.decode_graph``) against the eager step, on CPU.

The CUDA graph itself needs a GPU; what it replays is the graph-safe step, run here eagerly: device-length
split-K decode kernel (Triton interpreter), masked fp-tail attention, ring-slot writes from the device position,
host-side quantization of a filled tail. Like ``test_kv_kernels``, the interpreter must be on before triton's first
import, so when another module imported triton first these tests run in a child pytest process.
"""

from __future__ import annotations

import os
import sys

IN_PROCESS = "triton" not in sys.modules
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["DUO_QSERVE_TRITON"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import (  # noqa: E402
    run_in_interpreter_child,  # noqa: E402
    tiny_args,
    tiny_model,
)

from duo_qserve.cache import CacheConfig, CacheSpec, DuoKVCache  # noqa: E402
from duo_qserve.decode_graph import GraphedDecoder, masked_attention  # noqa: E402
from duo_qserve.kernels import kv_attention, kv_quantize  # noqa: E402
from duo_qserve.kernels.attention import reference as dense_reference  # noqa: E402


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
    arena = kv_quantize.quantize_keys(k, bits, group) + kv_quantize.quantize_values(v, bits)
    q = torch.randn(1, hkv * g, d, generator=gen)
    n = torch.tensor([groups * group], dtype=torch.int32)
    out, lse = kv_attention.decode_attention(q, *arena, n, bits, group, d**-0.5, num_splits=num_splits)
    if groups == 0:
        assert not out.any() and torch.isneginf(lse).all()
        return
    ref_out, ref_lse = kv_attention.reference(q, *arena, groups * group, bits, group, d**-0.5)
    assert (out - ref_out).abs().max() <= 2e-5 * ref_out.abs().max()
    assert (lse - ref_lse).abs().max() <= 1e-5 * ref_lse.abs().max()


def _pair(bits: int, n_retrieval: list[int], group: int, sink: int, recent: int, max_tokens: int):
    args = tiny_args()
    model = tiny_model(args)
    config = CacheConfig(kv_bits=bits, key_group=group, sink_tokens=sink, recent_tokens=recent)
    spec = CacheSpec(args, n_retrieval, config, max_tokens, torch.float32)
    return args, model, DuoKVCache(spec, "cpu"), DuoKVCache(spec, "cpu")


@pytest.mark.parametrize("triton", [True, False])
@pytest.mark.parametrize(
    "bits,n_retrieval", [(4, [1, 2]), (8, [1, 0]), (4, [2, 2])]
)  # mixed, one all-streaming layer, no streaming heads
@torch.no_grad()
def test_graph_safe_step_equals_eager_step(bits, n_retrieval, triton, interpreted, monkeypatch):
    """Pre-fill, then decode token by token with both steps across several key-group boundaries and ring
    wraps: logits agree and so does every cache tensor (the eagerly quantized groups bit for bit)."""
    if not triton:
        monkeypatch.setenv("DUO_QSERVE_TRITON", "0")  # the CPU reference paths
    group, sink, recent = 16, 4, 8
    args, model, eager, graphed = _pair(bits, n_retrieval, group, sink, recent, 120)
    ids = torch.randint(0, args.vocab_size, (100,), generator=torch.Generator().manual_seed(bits))
    prompt = 5  # shorter than sink + recent: the decoder starts on the eager fallback
    model(ids[:prompt], eager)
    model(ids[:prompt], graphed)
    decoder = GraphedDecoder(model, graphed, use_graph=False)
    worst = 0.0
    for i in range(prompt, len(ids)):
        want = model(ids[i : i + 1], eager, last_only=True)
        got = decoder.step(int(ids[i]))
        assert eager.seq_len == graphed.seq_len == i + 1
        worst = max(worst, (got - want).abs().max().item())
    assert worst < 1e-4, worst
    for a, b in zip(eager.layers, graphed.layers, strict=True):
        for name in a:
            if name in ("k_tail", "v_tail"):  # past the tail's length the graph-safe step leaves stale slots
                n = eager.seq_len % group
                assert torch.allclose(a[name][:, :n], b[name][:, :n], atol=1e-5), name
            elif a[name].dtype == torch.uint8:
                assert (a[name].int() - b[name].int()).abs().max() <= 1, name  # a rounding tie at most
            else:
                assert torch.allclose(a[name].float(), b[name].float(), atol=2e-3), name


def test_fallbacks():
    args, model, cache, _ = _pair(16, [2, 1], 16, 4, 8, 64)
    assert not GraphedDecoder(model, cache, use_graph=False).supported()  # fp16 retrieval heads
    args, model, cache, _ = _pair(4, [2, 1], 16, 4, 8, 64)
    decoder = GraphedDecoder(model, cache, use_graph=False)
    cache.seq_len = 11
    assert not decoder.supported()  # ring not full yet
    cache.seq_len = 12
    assert decoder.supported()
