"""Rotations (quant/rotation.py) and the calibration searches (quant/search.py) against float references.

Tolerances come from the arithmetic: a float64 Hadamard product sums b <= 512 terms of size |x|/sqrt(b), so each
element's rounding is at most ~b * 2^-53 ~ 6e-14 relative to |x| sqrt(b), and 1e-12 leaves a wide margin; a float32 model has ~2^-24 relative rounding per
operation, accumulated over sums of ~100 terms and a few layers, i.e. well under 1e-5 relative in the logits, so
1e-4 is loose for rounding yet far below what any wrong sign, transpose or missing fold produces (O(1), checked
by the negative control).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_w8a8 import CALIB, IDS, logits, rel_err, tiny_model
from torch import nn

from duo_qserve.kernels.hadamard import fast_hadamard, hadamard_block, hadamard_matrix
from duo_qserve.model import ModelArgs, RMSNorm, SiluAndMul, Transformer
from duo_qserve.quant import search
from duo_qserve.quant.rotation import SiluMulHadamard, residual_rotation, rotate_model
from duo_qserve.quant.w8a8 import (
    SiluMulHadamardQuant,
    W8A8Linear,
    activation_absmax,
    quantize_model_w8a8,
    smooth_model,
)

FLOAT64_TOL = 1e-12
MODEL_FP32_TOL = 1e-4


def qwen_like(tied: bool, seed: int = 0) -> nn.Module:
    """A random 2-layer model with q/k/v biases (Qwen2) and sizes that are not powers of two: dim 96 = 32 x 3,
    intermediate 160 = 32 x 5; random RMSNorm gains, so folding them matters."""
    torch.manual_seed(seed)
    args = ModelArgs(
        vocab_size=96, dim=96, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=16, intermediate_size=160,
        tie_word_embeddings=tied, attention_bias=True, extra={"model_type": "qwen2"},
    )  # fmt: skip
    model = Transformer(args).float().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.uniform_(0.5, 1.5)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_()
    return model


@pytest.mark.parametrize("n", [1, 2, 64, 96, 160, 576, 1536])
def test_fast_hadamard_is_the_blockwise_hadamard(n):
    b = hadamard_block(n)
    assert b & (b - 1) == 0 and n % b == 0 and (n // b) % 2 == 1  # the largest power-of-two factor
    h = hadamard_matrix(b)
    i = torch.arange(b)
    parity = torch.tensor([[bin(r & c).count("1") % 2 for c in i.tolist()] for r in i.tolist()])
    assert torch.equal(h, (1 - 2 * parity).to(torch.float64) / b**0.5)  # Sylvester's closed form
    torch.testing.assert_close(h @ h, torch.eye(b, dtype=torch.float64), rtol=0, atol=FLOAT64_TOL)
    x = torch.randn(5, n, dtype=torch.float64)
    ref = x @ torch.block_diag(*[h] * (n // b))
    torch.testing.assert_close(
        fast_hadamard(x), ref, rtol=0, atol=FLOAT64_TOL * x.abs().max().item() * b**0.5
    )
    torch.testing.assert_close(fast_hadamard(fast_hadamard(x)), x, rtol=0, atol=FLOAT64_TOL * 10)
    assert fast_hadamard(x.float()).dtype == torch.float32


@pytest.mark.parametrize("n", [64, 96, 576])
def test_residual_rotation_is_orthogonal_and_mixes_every_channel(n):
    r = residual_rotation(n, seed=3)
    torch.testing.assert_close(r @ r.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=FLOAT64_TOL)
    assert torch.equal(r, residual_rotation(n, seed=3)) and not torch.equal(r, residual_rotation(n, seed=4))
    # an outlier in one channel is spread over all of them: no zero entry
    assert (r.abs() > 0).all()


@pytest.mark.parametrize("tied", [False, True])
def test_rotation_keeps_the_float_model_function(tied):
    model = qwen_like(tied)
    ref = logits(model, IDS)
    embed = model.embed_tokens.weight.detach().clone()
    rotate_model(model)
    torch.testing.assert_close(
        logits(model, IDS), ref, rtol=MODEL_FP32_TOL, atol=MODEL_FP32_TOL * ref.abs().max()
    )
    assert rel_err(logits(model, IDS), ref) < MODEL_FP32_TOL
    # the embedding is rotated and, if it was tied, lm_head is now its own (rotated) matrix
    assert rel_err(model.embed_tokens.weight, embed) > 0.1
    assert model.lm_head.weight is not model.embed_tokens.weight and not model.args.tie_word_embeddings
    assert all(
        torch.equal(m.weight, torch.ones_like(m.weight)) for m in model.modules() if isinstance(m, RMSNorm)
    )
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(model)


def test_a_broken_rotation_is_caught():
    """Negative control for the tolerance above: leaving out the online Hadamard (down_proj still holds its
    inverse) breaks the function by far more than MODEL_FP32_TOL."""
    model = qwen_like(tied=True)
    ref = logits(model, IDS)
    rotate_model(model)
    for block in model.layers:
        block.mlp.act = SiluAndMul()
    assert rel_err(logits(model, IDS), ref) > 100 * MODEL_FP32_TOL


def test_hadamard_quant_matches_float_reference():
    gate, up = torch.randn(7, 160), torch.randn(7, 160)
    a = SiluMulHadamardQuant()(gate, up)
    y = SiluMulHadamard()(gate.double(), up.double())  # float64 reference
    assert ((a.q.double() * a.scale - y).abs() <= a.scale / 2 * (1 + 1e-4) + 1e-6).all()  # half a step
    assert (a.q.abs().amax(dim=1) == 127).all()  # each row's largest value takes the last code


def test_rotation_reduces_w8a8_error_on_outlier_channels():
    """The outlier channels that crush per-token int8 are spread by the rotation (tiny_model: x30 channels)."""
    ref = logits(tiny_model(), IDS)
    plain = rel_err(logits(quantize_model_w8a8(tiny_model()), IDS), ref)
    model = tiny_model()
    rotate_model(model)
    quantize_model_w8a8(model)
    assert isinstance(model.layers[0].mlp.act, SiluMulHadamardQuant)
    rotated = rel_err(logits(model, IDS), ref)
    print(f"logits relative error: W8A8 {plain:.4f}, rotated W8A8 {rotated:.4f}")
    assert rotated < plain


def test_keep_16bit_leaves_named_linears_and_their_inputs_float():
    model = tiny_model()
    ref = logits(model, IDS)
    full = rel_err(logits(quantize_model_w8a8(tiny_model()), IDS), ref)
    kept = ["layers.0.self_attn.k_proj", "layers.1.mlp.down_proj"]
    quantize_model_w8a8(model, keep_16bit=kept)
    b0, b1 = model.layers
    assert type(b0.self_attn.k_proj) is nn.Linear and isinstance(b0.self_attn.q_proj, W8A8Linear)
    assert type(b0.input_layernorm) is RMSNorm  # k_proj reads float, so q/v quantize it themselves
    assert type(b1.mlp.act) is SiluAndMul and type(b1.mlp.down_proj) is nn.Linear
    assert model.w8a8["keep_16bit"] == sorted(kept)
    assert rel_err(logits(model, IDS), ref) < full
    with pytest.raises(ValueError, match="names no linear"):
        quantize_model_w8a8(tiny_model(), keep_16bit=["layers.0.mlp.nope"])


def _inputs(model: nn.Module, module: nn.Module) -> torch.Tensor:
    seen = []
    handle = module.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    for ids in CALIB:
        logits(model, ids)
    handle.remove()
    return torch.cat(seen)


def test_choose_alphas_picks_the_least_error_per_group():
    model = tiny_model()
    stats = activation_absmax(model, CALIB)
    grid = (0.3, 0.5, 0.7, 0.9)
    alphas = search.choose_alphas(model, CALIB, stats, grid)
    assert len(alphas) == 2 * len(model.layers) and set(alphas) <= set(grid)
    # brute force for the first group (q/k/v of layer 0): smooth a copy per alpha, sum relative errors
    errors = []
    for alpha in grid:
        probe = copy.deepcopy(model)
        smooth_model(probe, stats, alpha)
        attn = probe.layers[0].self_attn
        x = probe.layers[0].input_layernorm(_inputs(probe, probe.layers[0].input_layernorm))
        errors.append(
            sum(
                e / r
                for e, r in (
                    search.w8a8_error(x, lin.weight) for lin in (attn.q_proj, attn.k_proj, attn.v_proj)
                )
            )
        )
    assert alphas[0] == grid[min(range(len(grid)), key=errors.__getitem__)]


def test_linear_sensitivity_ranks_by_measured_error():
    model = tiny_model()
    sens = search.linear_sensitivity(model, CALIB)
    assert len(sens) == 7 * len(model.layers) and all(v > 0 for v in sens.values())
    down = model.layers[1].mlp.down_proj
    e, r = search.w8a8_error(_inputs(model, down), down.weight)
    assert sens["layers.1.mlp.down_proj"] == pytest.approx(e / r, rel=1e-6)
    top = search.most_sensitive(sens, 3)
    assert len(top) == 3 and all(sens[top[0]] >= sens[n] for n in sens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rotated_w8a8_on_cuda_fp16():
    """The rotated W8A8 data flow through the Triton kernels, in fp16 as served, computes what the same quantized
    model computes on the CPU in fp16. (The quantization error itself is test_rotation_reduces_w8a8_error's
    concern: this model's x30 outlier channels make it ~0.07 in fp16 on either device.) Only the order of
    accumulation differs between the two, so an activation lands on another int8 code only where it sits within
    an fp16 rounding (2^-11 relative) of a code boundary, and each such flip moves one product by one step
    (1/127 of its row's absmax): 0.02 admits a few percent of flipped codes and is far below what a wrong scale,
    sign or transpose gives (O(1), test_a_broken_rotation_is_caught)."""
    model = tiny_model()
    rotate_model(model)
    model.half()
    on_cpu = quantize_model_w8a8(copy.deepcopy(model))
    on_gpu = quantize_model_w8a8(model.cuda())
    assert rel_err(logits(on_gpu, IDS.cuda()).cpu(), logits(on_cpu, IDS)) < 0.02
