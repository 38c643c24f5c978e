"""Attention of new queries over the quantized part of the retrieval-head cache.

The retrieval cache of one layer holds ``n_quant`` tokens (a multiple of the key group) as packed 4-bit or 8-bit
codes (layout in ``duo_qserve.quant.kv_quant``); every new query sees all of them. The result carries its
log-sum-exp so the cache can merge it with attention over the fp tail and the new tokens.

``reference`` de-quantizes everything and is the oracle; on CUDA the Triton kernels read the codes directly.
"""

from __future__ import annotations

import torch

from duo_qserve.kernels.attention import dense_attention
from duo_qserve.quant.kv_quant import dequantize_keys, dequantize_values


def reference(
    q: torch.Tensor,
    k_data: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor,
    v_data: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor,
    n_quant: int,
    bits: int,
    group: int,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D]; k_data/v_data [Hkv, N, D*bits/8] uint8; k_scale/k_zero [Hkv, N/group, D];
    v_scale/v_zero [Hkv, N]. Attends to tokens ``[0, n_quant)``. Returns (out [T, Hq, D], lse [T, Hq])."""
    ng = n_quant // group
    k = dequantize_keys(k_data[:, :n_quant], k_scale[:, :ng], k_zero[:, :ng], bits, group)
    v = dequantize_values(v_data[:, :n_quant], v_scale[:, :n_quant], v_zero[:, :n_quant], bits)
    return dense_attention(q, k, v, n_ctx=n_quant, sm_scale=sm_scale)


def quantized_prefix_attention(q, k_data, k_scale, k_zero, v_data, v_scale, v_zero, n_quant, bits, group, sm_scale):
    """Dispatch point used by the cache (reference until the Triton kernels land)."""
    return reference(q, k_data, k_scale, k_zero, v_data, v_scale, v_zero, n_quant, bits, group, sm_scale)
