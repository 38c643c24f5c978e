"""W8A8 quantization: weight/activation error bounds, SmoothQuant invariance, checkpoint loading and saving."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from duo_qserve.kernels.quantize_act import quantize_per_token
from duo_qserve.model import CausalAttention
from duo_qserve.quant.w8a8 import (
    QuantizedActivation,
    RMSNormQuant,
    SiluMulQuant,
    W8A8Linear,
    activation_absmax,
    load_activation_absmax,
    load_quantized,
    load_reference_w8a8_state_dict,
    quantize_model_w8a8,
    quantize_weight_per_channel,
    save_activation_absmax,
    save_quantized,
    smooth_model,
)

model_mod = pytest.importorskip("duo_qserve.model")

OUTLIERS = (3, 17, 22, 29)  # hidden channels given large activations, as real LLMs have


def tiny_model(seed: int = 0, tied: bool = False, dim: int = 64, outliers: bool = True) -> nn.Module:
    """A 2-layer random Llama with GQA. With ``outliers`` a few RMSNorm channels are scaled x30, so the
    linears' inputs have the outlier channels that make per-token activation quantization hard."""
    torch.manual_seed(seed)
    args = model_mod.ModelArgs(
        vocab_size=96, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=dim // 4, intermediate_size=160,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model = model_mod.Transformer(args).float().eval()
    with torch.no_grad():
        for block in model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
                if outliers:
                    norm.weight[list(OUTLIERS)] *= 30
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, CausalAttention())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


IDS = torch.arange(40) % 96
CALIB = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))


def test_weight_quantization_error_bound():
    w = torch.randn(48, 80) * torch.linspace(0.01, 3, 48)[:, None]
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (48,)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1) == 127).all()  # symmetric, full range per row
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()  # half a step at most


def test_activation_quantization_error_bound():
    x = torch.randn(7, 96) * 4
    q, s = quantize_per_token(x)
    assert s.shape == (7, 1) and (q.abs().amax(dim=1) == 127).all()
    assert ((q.float() * s - x).abs() <= s / 2 * (1 + 1e-5)).all()


def test_w8a8_linear_close_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(256, 192, bias=False)
    x = torch.randn(2, 10, 256)
    qlin = W8A8Linear.from_linear(lin)
    y, y_q = lin(x), qlin(x)
    assert y_q.shape == y.shape and y_q.dtype == torch.float32
    assert rel_err(y_q, y) < 0.02
    # A pre-quantized input gives the same result as the float one (what the fused norm/activation feed in).
    torch.testing.assert_close(qlin(QuantizedActivation(*quantize_per_token(x))), y_q)
    # The smooth scale multiplies the weight columns: fed x / s, the layer computes the same product.
    s = torch.rand(256) + 0.5
    assert rel_err(W8A8Linear.from_linear(lin, smooth_scale=s)(x / s), y) < 0.02


def test_fused_modules_match_float_ops():
    torch.manual_seed(0)
    norm = model_mod.RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(5, 96)
    a = RMSNormQuant(norm.weight, norm.eps)(x)
    assert isinstance(a, QuantizedActivation) and a.q.dtype == torch.int8
    assert rel_err(a.q.float() * a.scale, norm(x)) < 0.01
    gate, up = torch.randn(5, 96), torch.randn(5, 96)
    b = SiluMulQuant()(gate, up)
    assert rel_err(b.q.float() * b.scale, model_mod.SiluAndMul()(gate, up)) < 0.02


def test_smoothing_leaves_float_model_unchanged():
    model = tiny_model()
    ref = logits(model, IDS)
    smoothed = copy.deepcopy(model)
    smooth_model(smoothed, activation_absmax(smoothed, CALIB), alpha=0.5)
    assert not torch.equal(smoothed.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(logits(smoothed, IDS), ref, rtol=1e-5, atol=1e-5)


def test_quantized_model_swaps_modules_and_stays_close():
    model = tiny_model(outliers=False)
    ref = logits(model, IDS)
    quantize_model_w8a8(model)
    block = model.layers[0]
    assert isinstance(block.input_layernorm, RMSNormQuant) and isinstance(block.mlp.act, SiluMulQuant)
    assert all(
        isinstance(getattr(block.self_attn, n), W8A8Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    )
    assert all(isinstance(getattr(block.mlp, n), W8A8Linear) for n in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.norm, model_mod.RMSNorm)  # stay float
    assert rel_err(logits(model, IDS), ref) < 0.03


def test_smoothquant_reduces_error():
    """With outlier channels, per-token int8 crushes the other channels; SmoothQuant must recover most of it.
    (``w8a8.DEFAULT_ALPHA`` itself is chosen by perplexity on the real model: duo_qserve/eval/perplexity.py.)"""
    ref = logits(tiny_model(), IDS)
    errs = {"none": rel_err(logits(quantize_model_w8a8(tiny_model()), IDS), ref)}
    for alpha in (0.35, 0.5, 0.65, 0.8):
        errs[alpha] = rel_err(logits(quantize_model_w8a8(tiny_model(), CALIB, alpha=alpha), IDS), ref)
    print("logits relative error by SmoothQuant alpha:", {k: round(v, 4) for k, v in errs.items()})
    assert min(errs[a] for a in (0.35, 0.5, 0.65, 0.8)) < errs["none"] * 0.7


def _reference_layout(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict laid out like the QServe/DuoAttention W8A8 ``pytorch_model.bin`` (kernel-notes 1.2)."""
    out = {}
    for k, v in model.state_dict().items():
        name = k if k.startswith("lm_head.") else f"model.{k}"
        out[name] = v.clone() if v.dtype == torch.int8 else v.half()  # fp16 norms, embeddings and scales
    out["model.layers.0.self_attn.kv_scale_quant_orig"] = torch.tensor([0.1, 0.2])  # present in -kv8 files
    return out


def test_load_reference_checkpoint(tmp_path):
    src = quantize_model_w8a8(tiny_model(seed=0), CALIB)
    torch.save(_reference_layout(src), tmp_path / "pytorch_model.bin")
    dst = quantize_model_w8a8(tiny_model(seed=1))
    load_reference_w8a8_state_dict(dst, tmp_path / "pytorch_model.bin")
    assert dst.layers[1].self_attn.q_proj.dequant_scale.dtype == torch.float32
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(b, a if a.dtype == torch.int8 else a.half().float()), (
            k
        )  # exact, after fp16 on disk
    # fp16 rounding of norms/scales moves a few activation codes by one step; this random model amplifies that.
    assert rel_err(logits(dst, IDS), logits(src, IDS)) < 0.05


def test_reference_checkpoint_refused_with_every_problem(tmp_path):
    state = _reference_layout(quantize_model_w8a8(tiny_model()))
    del state["model.layers.1.mlp.down_proj.dequant_scale"]
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:8]
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].half()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        load_reference_w8a8_state_dict(quantize_model_w8a8(tiny_model()), tmp_path / "pytorch_model.bin")
    msg = str(err.value)
    assert "3 problems" in msg and "missing model.layers.1.mlp.down_proj.dequant_scale" in msg
    assert "k_proj.weight: shape (8, 64)" in msg and "up_proj.weight: dtype torch.float16" in msg


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    src = quantize_model_w8a8(tiny_model(seed=0, tied=tied), CALIB, alpha=0.5)
    save_quantized(src, src.args.as_dict(), tmp_path)
    meta = json.loads((tmp_path / "quantization.json").read_text())
    assert meta["format"] == "duo-qserve-w8a8" and meta["version"] == 1
    assert meta["alpha"] == 0.5 and meta["smoothquant"] is True and meta["model_config"]["dim"] == 64
    dst = quantize_model_w8a8(tiny_model(seed=1, tied=tied))
    state = load_quantized(tmp_path, model=dst)
    assert state["meta"] == meta and dst.w8a8 == {"alpha": 0.5, "smoothquant": True}
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    torch.testing.assert_close(logits(dst, IDS), logits(src, IDS))


def test_load_quantized_refuses_version_and_shape_mismatch(tmp_path):
    src = quantize_model_w8a8(tiny_model())
    save_quantized(src, src.args.as_dict(), tmp_path)
    with pytest.raises(ValueError, match="problems"):
        load_quantized(tmp_path, model=quantize_model_w8a8(tiny_model(dim=32)))
    with pytest.raises(ValueError, match="quantize_model_w8a8"):
        load_quantized(tmp_path, model=tiny_model())
    meta = json.loads((tmp_path / "quantization.json").read_text())
    (tmp_path / "quantization.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(ValueError, match="version 2"):
        load_quantized(tmp_path)


def test_shipped_statistics_give_the_same_model_as_calibration_text(tmp_path):
    """Statistics saved from calibration text and loaded again smooth exactly as the text does; a file made for
    another shape is refused."""
    stats = activation_absmax(tiny_model(), CALIB)
    save_activation_absmax(tmp_path / "stats.safetensors", stats, {"text": "random ids"})
    loaded = load_activation_absmax(tmp_path / "stats.safetensors", tiny_model())
    from_text = quantize_model_w8a8(tiny_model(), CALIB, alpha=0.5)
    from_file = quantize_model_w8a8(tiny_model(), alpha=0.5, act_absmax=loaded)
    assert from_file.w8a8 == {"alpha": 0.5, "smoothquant": True}
    torch.testing.assert_close(logits(from_file, IDS), logits(from_text, IDS), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        load_activation_absmax(tmp_path / "stats.safetensors", tiny_model(dim=32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantized_model_on_cuda_fp16():
    """The whole W8A8 data flow through the Triton kernels, in fp16 as served."""
    model = tiny_model(outliers=False).cuda().half()
    ids = IDS.cuda()
    ref = logits(model, ids)
    quantize_model_w8a8(model, CALIB.cuda())
    assert model.layers[0].self_attn.q_proj.compute_dtype == torch.float16
    assert rel_err(logits(model, ids), ref) < 0.05
