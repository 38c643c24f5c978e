"""Quantize-on-write for the retrieval-head cache: whole key groups of new keys/values to codes + scales."""

from __future__ import annotations

import torch

from duo_qserve.quant.kv_quant import quantize_keys, quantize_values


def reference(k: torch.Tensor, v: torch.Tensor, bits: int, group: int):
    kd, ks, kz = quantize_keys(k, bits, group)
    vd, vs, vz = quantize_values(v, bits)
    return kd, ks, kz, vd, vs, vz


def quantize_kv(k: torch.Tensor, v: torch.Tensor, bits: int, group: int):
    """k, v [H, T, D] with T a multiple of ``group`` -> (k_data, k_scale, k_zero, v_data, v_scale, v_zero)."""
    return reference(k, v, bits, group)
