"""The key schemes of bench/kv_keys.py: the rotations they rely on are exact, and each quantizes what it says.

Tolerances: float64 products of 64 terms round at ~1e-15 relative, so 1e-12 is loose; float32 RoPE and its
inverse round at ~1e-7 relative per element, so 1e-5 is loose; 8-bit codes leave at most half a step of the range
(1/510 of it) per channel, about 1e-3 of the keys' norm here, against ~3e-2 at 4 bits.
"""

from __future__ import annotations

import math

import pytest
import torch

from duo_qserve.bench import kv_keys
from duo_qserve.model import ModelArgs, rope_cos_sin, rope_inv_freq

D, T, H = 64, 256, 2


def tables(n: int = T):
    args = ModelArgs(vocab_size=8, dim=128, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=D,
                     intermediate_size=8, rope_theta=10000.0)  # fmt: skip
    return rope_cos_sin(rope_inv_freq(args), torch.arange(n))


def stable_channel_keys(seed: int = 0) -> torch.Tensor:
    """Pre-RoPE keys as real ones look: a fixed value per channel (a few outliers) plus small noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(H, 1, D, generator=g)
    base[:, :, :4] *= 8.0
    return base + 0.1 * torch.randn(H, T, D, generator=g)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_hadamard_is_orthogonal_and_leaves_q_dot_k_unchanged():
    h = kv_keys.hadamard(D).double()
    assert torch.allclose(h @ h.T, torch.eye(D, dtype=torch.float64), atol=1e-12)
    g = torch.Generator().manual_seed(1)
    q, k = (
        torch.randn(5, D, generator=g, dtype=torch.float64),
        torch.randn(T, D, generator=g, dtype=torch.float64),
    )
    assert torch.allclose((q @ h) @ (k @ h).T, q @ k.T, rtol=0, atol=1e-12)


def test_unrope_inverts_rope():
    cos, sin = tables()
    k = stable_channel_keys()
    assert rel(kv_keys.unrope(kv_keys.rope(k, cos, sin), cos, sin), k) < 1e-5
    assert rel(kv_keys.rope(k, cos, sin), k) > 0.1  # RoPE really turns them


def test_pre_rope_quantization_with_rope_after_dequantization_gives_the_roped_keys_at_high_bits(monkeypatch):
    cos, sin = tables()
    post = kv_keys.rope(stable_channel_keys(), cos, sin)
    scheme = kv_keys.SCHEMES["pre-ch128"].keys
    err4 = rel(scheme(post, cos, sin), post)
    monkeypatch.setattr(kv_keys, "BITS", 8)
    err8 = rel(scheme(post, cos, sin), post)
    assert err8 < 5e-3
    assert err4 > 8 * err8


def test_pre_rope_keys_with_stable_channels_quantize_better_than_post_rope_keys():
    cos, sin = tables()
    post = kv_keys.rope(stable_channel_keys(), cos, sin)
    pre_err = rel(kv_keys.SCHEMES["pre-ch128"].keys(post, cos, sin), post)
    post_err = rel(kv_keys.SCHEMES["post-ch128"].keys(post, cos, sin), post)
    assert pre_err < post_err / 3


def test_hadamard_schemes_score_as_rotated_queries_against_rotated_codes():
    """Keys back in the original space give the scores a kernel would compute from (q H) and the codes of (k H)."""
    cos, sin = tables()
    k = kv_keys.rope(stable_channel_keys(), cos, sin)
    q = torch.randn(3, D, generator=torch.Generator().manual_seed(2))
    h = kv_keys.hadamard(D)
    in_rotated_space = (q @ h) @ kv_keys.per_token(k @ h)[0].T
    assert torch.allclose(q @ kv_keys.SCHEMES["had-tok"].keys(k, cos, sin)[0].T, in_rotated_space, atol=1e-4)


def test_head_metrics_are_zero_for_identical_keys_and_grow_with_noise():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, D, generator=g) for n in (8, T, T))
    same = kv_keys.head_metrics(3 * q, k, k.clone(), v, 1 / math.sqrt(D))
    assert same["kl"] == pytest.approx(0, abs=1e-6) and same["out_rel_err"] == pytest.approx(0, abs=1e-6)
    assert (
        same["top_recall"] == 1
        and same["top1_kept"] == 1
        and same["top_mass_err"] == pytest.approx(0, abs=1e-6)
    )
    noisy = kv_keys.head_metrics(3 * q, k, k + 0.3 * torch.randn(T, D, generator=g), v, 1 / math.sqrt(D))
    assert noisy["kl"] > 1e-3 and noisy["out_rel_err"] > 1e-2 and noisy["top_recall"] < 1


def test_scale_overhead_per_token_and_head():
    assert kv_keys.SCHEMES["post-ch128"].overhead(128) == dict(
        data_bytes=64, scale_bytes=4, scale_overhead=0.0625
    )
    assert kv_keys.SCHEMES["post-ch64"].overhead(64)["scale_overhead"] == 0.125
    assert kv_keys.SCHEMES["post-tok"].overhead(64)["scale_bytes"] == 4


def test_niah_summary_counts_the_questions_only_one_scheme_found():
    rec = lambda *found: [dict(found=f) for f in found]  # noqa: E731
    s = kv_keys.niah_summary({"post-ch128": rec(True, False, True), "pre-ch128": rec(True, True, False)})
    assert s["pre-ch128"]["only_this"] == 1 and s["pre-ch128"]["only_baseline"] == 1
    assert s["post-ch128"]["found"] == pytest.approx(2 / 3)


def test_result_file_keeps_the_data_and_puts_a_table_row_on_one_line():
    import json

    result = {"a": [[0.1, 2e-05, float("nan")], [3, 4, 5]], "b": {"s": "x [1, 2]"}}
    text = kv_keys.dumps(result)
    assert json.loads(text) == {"a": [[0.1, 2e-05, None], [3, 4, 5]], "b": {"s": "x [1, 2]"}}
    assert "[3,4,5]" in text.split("\n")[3]
