"""Choices made on calibration text for W8A8: SmoothQuant's alpha per layer, and which linears to keep in 16-bit.

Both measure the same thing, a linear's relative output error under W8A8 on calibration activations,
``|Q(X) Q(W)^T - X W^T|^2 / |X W^T|^2`` (``Q`` the int8 round trip the kernels do: per token for X, per output
channel for W), with the activations X that the float model feeds the linear. It is a per-layer proxy for the
loss, one forward pass of the calibration text instead of one per candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..kernels.quantize_act import quantize_per_token_reference
from .w8a8 import _smooth_groups, forward_with_input_hooks, quantize_weight_per_channel, smoothing_scale

ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _dequantized_weight(w: torch.Tensor) -> torch.Tensor:
    q, s = quantize_weight_per_channel(w)
    return q.float() * s[:, None]


def _dequantized_rows(x: torch.Tensor) -> torch.Tensor:
    q, s = quantize_per_token_reference(x)
    return q.float() * s


def w8a8_error(x: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """(squared error of the W8A8 product, squared norm of the float product) of ``x`` [T, K] by ``w`` [N, K]."""
    ref = x.float() @ w.float().T
    err = _dequantized_rows(x) @ _dequantized_weight(w).T - ref
    return err.pow(2).sum().item(), ref.pow(2).sum().item()


@torch.no_grad()
def choose_alphas(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    act_absmax: list[torch.Tensor],
    grid: Sequence[float] = ALPHA_GRID,
) -> list[float]:
    """SmoothQuant's alpha for each smoothing group (``w8a8._smooth_groups``: q/k/v and gate/up of every layer),
    the one of ``grid`` with the least summed relative output error (module docstring) of the group's linears on
    the calibration activations, smoothed with that alpha's scales from ``act_absmax``. Feed the result to
    ``quantize_model_w8a8(alpha=...)`` with the same ``act_absmax``; the model is not changed."""
    groups = _smooth_groups(model)
    err = [torch.zeros(len(linears), len(grid), dtype=torch.float64) for _, linears in groups]
    ref = [torch.zeros(len(linears), 1, dtype=torch.float64) for _, linears in groups]

    def measure(i: int) -> Callable:
        linears = groups[i][1]
        w_max = torch.cat([lin.weight.abs().float() for lin in linears]).amax(dim=0)
        x_max = act_absmax[i].to(w_max.device, torch.float32)

        def record(x: torch.Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()
            for j, alpha in enumerate(grid):
                s = smoothing_scale(x_max, w_max, alpha)
                for k, lin in enumerate(linears):
                    e, r = w8a8_error(x / s, lin.weight.float() * s[None, :])
                    err[i][k, j] += e
                    if j == 0:  # the float product is the same for every alpha
                        ref[i][k] += r

        return record

    forward_with_input_hooks(
        model, calibration_ids, {linears[0]: measure(i) for i, (_, linears) in enumerate(groups)}
    )
    return [
        float(grid[int((e / r.clamp_min(1e-30)).sum(dim=0).argmin())]) for e, r in zip(err, ref, strict=True)
    ]


@torch.no_grad()
def linear_sensitivity(model: nn.Module, calibration_ids: torch.Tensor) -> dict[str, float]:
    """Relative output error under W8A8 (module docstring) of every linear of the transformer blocks, by module
    name, on the calibration text: run it on the float model as it will be quantized (smoothed or rotated)."""
    linears = {n: m for n, m in model.layers.named_modules(prefix="layers") if isinstance(m, nn.Linear)}
    sq = {n: [0.0, 0.0] for n in linears}

    def measure(name: str) -> Callable:
        def record(x: torch.Tensor) -> None:
            err, ref = w8a8_error(x.reshape(-1, x.shape[-1]), linears[name].weight)
            sq[name][0] += err
            sq[name][1] += ref

        return record

    forward_with_input_hooks(model, calibration_ids, {m: measure(n) for n, m in linears.items()})
    return {n: err / max(ref, 1e-30) for n, (err, ref) in sq.items()}


def most_sensitive(sensitivity: dict[str, float], n: int) -> list[str]:
    """The ``n`` linears with the largest ``linear_sensitivity``, most sensitive first."""
    return sorted(sensitivity, key=sensitivity.__getitem__, reverse=True)[:n]
