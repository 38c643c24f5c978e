"""W8A8: int8 weights (symmetric, per output channel) x int8 activations (symmetric, per token), as in QServe.

``quantize_model_w8a8`` swaps modules of ``duo_qserve.model.Transformer`` in place, so the model code stays
unchanged and the data flow becomes QServe's (kernel-notes 1.1)::

    residual -> RMSNormQuant (fused norm + quant) -> int8 q/k/v GEMMs -> attention -> per-token quant -> int8 o_proj
    residual -> RMSNormQuant -> int8 gate/up GEMMs -> SiluMulQuant (fused) -> int8 down_proj

Embeddings, the final norm and ``lm_head`` stay in float (QServe does the same).

Optional SmoothQuant balancing (with calibration ids) moves activation outliers into the weights before
quantizing: per input channel ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``; the RMSNorm weight feeding the
linears is divided by ``s`` and their weight columns multiplied by it, which leaves the float model unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..kernels.int8_gemm import w8a8_matmul, w8a8_matmul_group
from ..kernels.quantize_act import (
    quantize_per_token,
    rmsnorm_quantize,
    silu_mul_hadamard_quantize,
    silu_mul_quantize,
)
from ..model import CausalAttention
from .rotation import SiluMulHadamard

FORMAT = "duo-qserve-w8a8"
VERSION = 1
# alpha from perplexity of SmolLM2-135M-Instruct on held-out essays (benchmarks/results/perplexity-w8a8-*.json,
# `python -m duo_qserve.eval.perplexity`): fp32 25.19; W8A8 unsmoothed +2.5%; SmoothQuant alpha 0.3 / 0.5 / 0.7 /
# 0.85: +2.1 / +1.5 / +1.1 / +1.2%. 0.7 is the best measured.
DEFAULT_ALPHA = 0.7

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (w_q int8 [N, K], scale fp32 [N]): symmetric +-127 per output channel, ``w ~= w_q * scale``."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1).clamp_min(1e-10) / 127.0
    return torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class QuantizedActivation(NamedTuple):
    """int8 rows [..., K] with one fp32 scale per token [..., 1]: what the fused kernels hand to W8A8Linear."""

    q: torch.Tensor
    scale: torch.Tensor


def _quantized(x: torch.Tensor | QuantizedActivation) -> QuantizedActivation:
    """A linear's input as int8 rows: float inputs (o_proj's, from attention) are quantized per token here."""
    return x if isinstance(x, QuantizedActivation) else QuantizedActivation(*quantize_per_token(x))


class W8A8Linear(nn.Module):
    """nn.Linear with int8 weight ``[out, in]``, fp32 per-output-channel ``dequant_scale`` and an optional bias
    in ``compute_dtype`` (Qwen2's q/k/v), added in the int8 GEMM's epilogue.

    Accepts a QuantizedActivation, or a float tensor that it quantizes per token itself (o_proj's input comes
    from attention). The output dtype is ``compute_dtype``, fixed at construction: quantize a model after casting
    it to the dtype it will serve in.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        compute_dtype: torch.dtype = torch.float16,
        bias: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("dequant_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=compute_dtype) if bias else None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        smooth_scale: torch.Tensor | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> W8A8Linear:
        """Quantize ``linear``; ``smooth_scale`` [in] multiplies the weight columns first (SmoothQuant; the bias
        is unchanged by it)."""
        w = linear.weight.detach().float()
        if smooth_scale is not None:
            w = w * smooth_scale.float()[None, :]
        dtype = compute_dtype or linear.weight.dtype
        mod = cls(linear.in_features, linear.out_features, dtype, bias=linear.bias is not None)
        mod.weight, mod.dequant_scale = quantize_weight_per_channel(w)
        if linear.bias is not None:
            mod.bias = linear.bias.detach().to(dtype)
        return mod.to(linear.weight.device)

    adds_residual = True  # ``model.add_linear``: forward(x, residual) adds it in the GEMM epilogue

    def forward(
        self, x: torch.Tensor | QuantizedActivation, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``self(x)``, plus ``residual`` [..., out_features] if given (product, bias and residual summed in fp32
        in the GEMM's epilogue, rounded once)."""
        x = _quantized(x)
        lead = x.q.shape[:-1]
        res = None if residual is None else residual.reshape(-1, self.out_features)
        out = w8a8_matmul(
            x.q.reshape(-1, self.in_features), x.scale.reshape(-1, 1), self.weight, self.dequant_scale,
            self.compute_dtype, residual=res, bias=self.bias,
        )  # fmt: skip
        return out.reshape(*lead, self.out_features)

    @staticmethod
    def forward_group(x: torch.Tensor | QuantizedActivation, linears: list[W8A8Linear]) -> list[torch.Tensor]:
        """``[linear(x) for linear in linears]``, x quantized once and, at batch 1 on the GPU, one GEMV launch
        for up to three weights (``model.project``: q/k/v, gate/up), biases added in its epilogue."""
        x = _quantized(x)
        lead, k = x.q.shape[:-1], linears[0].in_features
        weights = [(lin.weight, lin.dequant_scale) for lin in linears]
        biases = None
        if any(lin.bias is not None for lin in linears):  # a linear without one in a biased group adds zeros
            biases = [
                lin.weight.new_zeros(lin.out_features, dtype=lin.compute_dtype)
                if lin.bias is None
                else lin.bias
                for lin in linears
            ]
        outs = w8a8_matmul_group(
            x.q.reshape(-1, k), x.scale.reshape(-1, 1), weights, linears[0].compute_dtype, biases=biases
        )
        return [out.reshape(*lead, lin.out_features) for out, lin in zip(outs, linears, strict=True)]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"compute_dtype={self.compute_dtype}, bias={self.bias is not None}"
        )


class RMSNormQuant(nn.Module):
    """The model's RMSNorm (same ``weight`` and ``eps``) fused with per-token int8 quantization."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> QuantizedActivation:
        return QuantizedActivation(*rmsnorm_quantize(x, self.weight, self.eps))


class SiluMulQuant(nn.Module):
    """silu(gate) * up fused with per-token int8 quantization (the input of down_proj)."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> QuantizedActivation:
        return QuantizedActivation(*silu_mul_quantize(gate, up))


class SiluMulHadamardQuant(nn.Module):
    """``rotation.SiluMulHadamard`` followed by per-token int8 quantization, in one kernel: the input of a rotated
    model's down_proj."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> QuantizedActivation:
        return QuantizedActivation(*silu_mul_hadamard_quantize(gate, up))


def _smooth_groups(model: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(RMSNorm, the linears reading its output) pairs; the first linear of each group is hooked for statistics."""
    groups = []
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        groups.append((block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]))
        groups.append((block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
    return groups


@torch.no_grad()
def activation_absmax(model: nn.Module, calibration_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-input-channel max |x| at the input of each smoothing group, over every calibration token.

    ``calibration_ids``: [T] or [n_sequences, T]; each sequence runs as its own forward with no past.
    """
    groups = _smooth_groups(model)
    stats: list[torch.Tensor | None] = [None] * len(groups)

    def hook(i: int) -> Callable:
        def record(x: torch.Tensor) -> None:
            m = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            stats[i] = m if stats[i] is None else torch.maximum(stats[i], m)

        return record

    forward_with_input_hooks(
        model, calibration_ids, {linears[0]: hook(i) for i, (_, linears) in enumerate(groups)}
    )
    return stats


def forward_with_input_hooks(
    model: nn.Module, calibration_ids: torch.Tensor, hooks: dict[nn.Module, Callable[[torch.Tensor], None]]
) -> None:
    """Forward each calibration sequence (``[T]`` or ``[n, T]``, no past) with ``hooks[module](x)`` called on
    the (detached) input of each module; the hooks are removed afterwards."""
    handles = [
        m.register_forward_pre_hook(lambda _m, args, f=f: f(args[0].detach())) for m, f in hooks.items()
    ]
    try:
        for ids in calibration_ids.reshape(-1, calibration_ids.shape[-1]):
            model(ids.to(model.embed_tokens.weight.device), CausalAttention())
    finally:
        for h in handles:
            h.remove()


def smoothing_scale(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale ``max|X_j|^alpha / max|W_j|^(1-alpha)`` (floored, so a dead channel
    cannot divide by zero)."""
    return (x_max.clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def smooth_model(
    model: nn.Module, act_absmax: list[torch.Tensor], alpha: float | Sequence[float] = DEFAULT_ALPHA
) -> None:
    """SmoothQuant in place on a float model: fold ``1/s`` into each RMSNorm, ``s`` into the weight columns;
    ``act_absmax`` is ``activation_absmax`` of calibration text; ``alpha`` one value, or one per smoothing group
    (``search.choose_alphas``)."""
    groups = _smooth_groups(model)
    alphas = [alpha] * len(groups) if isinstance(alpha, (int, float)) else list(alpha)
    for (norm, linears), x_max, alpha in zip(groups, act_absmax, alphas, strict=True):
        x_max = x_max.to(norm.weight.device, torch.float32)
        w_max = torch.cat([lin.weight.detach().abs().float() for lin in linears]).amax(dim=0)
        s = smoothing_scale(x_max, w_max, alpha)
        norm.weight.copy_((norm.weight.float() / s).to(norm.weight.dtype))
        for lin in linears:
            lin.weight.copy_((lin.weight.float() * s[None, :]).to(lin.weight.dtype))


def save_activation_absmax(path: str | Path, act_absmax: list[torch.Tensor], meta: dict[str, str]) -> None:
    """Write ``activation_absmax`` statistics (one tensor per smoothing group) as safetensors, with ``meta``
    (e.g. what text they come from). A model shipped with them gets SmoothQuant without calibration text."""
    tensors = {f"group.{i}": x.detach().float().cpu().contiguous() for i, x in enumerate(act_absmax)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "duo-qserve-act-absmax", **meta})


def load_activation_absmax(path: str | Path, model: nn.Module) -> list[torch.Tensor]:
    """Read ``save_activation_absmax`` statistics for ``model``, refusing a file made for another shape."""
    tensors = load_file(str(path))
    groups = _smooth_groups(model)
    want = [(f"group.{i}", linears[0].in_features) for i, (_, linears) in enumerate(groups)]
    got = [(k, v.shape[0]) for k, v in sorted(tensors.items(), key=lambda kv: int(kv[0].split(".")[1]))]
    if got != want:
        raise ValueError(
            f"{path}: activation statistics for {len(got)} groups do not fit this model ({len(want)})"
        )
    return [tensors[k] for k, _ in want]


@torch.no_grad()
def quantize_model_w8a8(
    model: nn.Module,
    calibration_ids: torch.Tensor | None = None,
    alpha: float | Sequence[float] = DEFAULT_ALPHA,
    act_absmax: list[torch.Tensor] | None = None,
    keep_16bit: Collection[str] = (),
) -> nn.Module:
    """Swap norms, linears and the MLP activation for their W8A8 versions, in place. SmoothQuant first when
    ``calibration_ids`` or their statistics ``act_absmax`` (``load_activation_absmax``) are given, with ``alpha``
    one value or one per smoothing group. The output dtype of every linear is the model's current dtype.

    ``keep_16bit``: linears, by module name (``"layers.3.mlp.down_proj"``, ``search.most_sensitive``), left in
    the model's float dtype with float inputs: the norm or activation in front of them stays float too, and the
    int8 linears that share that input quantize it themselves. A rotated model (``rotation.rotate_model``) keeps
    its online Hadamard before down_proj."""
    if calibration_ids is not None:
        act_absmax = activation_absmax(model, calibration_ids)
    if act_absmax is not None:
        smooth_model(model, act_absmax, alpha)
    known = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if unknown := set(keep_16bit) - known:
        raise ValueError(f"keep_16bit names no linear of this model: {', '.join(sorted(unknown))}")
    dtype = model.embed_tokens.weight.dtype
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        kept = {n.removeprefix(prefix) for n in keep_16bit if n.startswith(prefix)}  # "mlp.down_proj", ...
        for name, readers in (
            ("input_layernorm", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}),
            ("post_attention_layernorm", {"mlp.gate_proj", "mlp.up_proj"}),
        ):
            norm = getattr(block, name)
            if not kept & readers:
                setattr(block, name, RMSNormQuant(norm.weight, norm.eps))
        for part, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            parent = getattr(block, part)
            for name in names:
                if f"{part}.{name}" not in kept:
                    setattr(parent, name, W8A8Linear.from_linear(getattr(parent, name), compute_dtype=dtype))
        if "mlp.down_proj" not in kept:
            rotated = isinstance(block.mlp.act, SiluMulHadamard)
            block.mlp.act = SiluMulHadamardQuant() if rotated else SiluMulQuant()
    alpha = alpha if isinstance(alpha, (int, float)) else list(alpha)
    model.w8a8 = {"alpha": alpha, "smoothquant": act_absmax is not None}
    if keep_16bit:
        model.w8a8["keep_16bit"] = sorted(keep_16bit)
    if getattr(model, "rotation", None) is not None:
        model.w8a8["rotation"] = model.rotation
    return model


def _load_checked(
    model: nn.Module, tensors: dict[str, torch.Tensor], file_key: Callable[[str], str], source: str
):
    """Load ``tensors`` (named by ``file_key(model_key)``) into a W8A8 model, or refuse with every problem listed.

    int8 tensors must be int8 on disk; float tensors are cast to the model's dtype (scales to fp32).
    """
    if not any(isinstance(m, W8A8Linear) for m in model.modules()):
        raise ValueError("load into a model already converted by quantize_model_w8a8")
    tied = model.lm_head.weight is model.embed_tokens.weight
    problems, converted = [], {}
    for key, want in model.state_dict().items():
        name = file_key(key)
        if name not in tensors:
            if not (tied and key == "lm_head.weight"):
                problems.append(f"missing {name}")
            continue
        got = tensors[name]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif (got.dtype == torch.int8) != (want.dtype == torch.int8) or not (
            got.dtype.is_floating_point or got.dtype == torch.int8
        ):
            problems.append(f"{name}: dtype {got.dtype}, expected {want.dtype}")
        else:
            converted[key] = got.to(want.dtype)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"{source} does not fit this model ({len(problems)} problems): {shown}")
    model.load_state_dict(converted, strict=False)


def load_reference_w8a8_state_dict(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a QServe/DuoAttention W8A8 ``pytorch_model.bin`` (kernel-notes 1.2: HF names, int8 ``*_proj.weight``,
    per-output-channel ``*_proj.dequant_scale``, fp16 embeddings/norms/lm_head with smoothing folded into the norms)
    into a model converted by ``quantize_model_w8a8`` (built with the checkpoint's config). Extra tensors such as
    ``kv_scale_quant_orig`` are ignored: KV scales are computed at run time."""
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    _load_checked(model, tensors, lambda k: k if k.startswith("lm_head.") else f"model.{k}", str(path))
    return model


def save_quantized(model: nn.Module, config_dict: dict, out_dir: str | Path) -> None:
    """Write ``model.safetensors`` + ``quantization.json`` for a model converted by ``quantize_model_w8a8``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.lm_head.weight is model.embed_tokens.weight:
        del state["lm_head.weight"]  # tied: safetensors refuses shared storage, and loading re-ties it
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"))
    info = getattr(model, "w8a8", {"alpha": None, "smoothquant": False})
    meta = {"format": FORMAT, "version": VERSION, **info, "model_config": config_dict}
    (out / "quantization.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_quantized(out_dir: str | Path, model: nn.Module | None = None) -> dict:
    """Read a ``save_quantized`` directory -> {"meta": quantization.json, "tensors": state dict}.

    With ``model`` (built from ``meta["model_config"]`` and converted by ``quantize_model_w8a8``) the tensors are
    also loaded into it, refusing any missing or mis-shaped one.
    """
    d = Path(out_dir)
    meta = json.loads((d / "quantization.json").read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{d}: quantization format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this code reads {FORMAT!r} version {VERSION}"
        )
    tensors = load_file(str(d / "model.safetensors"))
    if model is not None:
        _load_checked(model, tensors, lambda k: k, str(d))
        model.w8a8 = {"alpha": meta.get("alpha"), "smoothquant": meta.get("smoothquant", False)}
    return {"meta": meta, "tensors": tensors}
