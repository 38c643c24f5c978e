"""Dense attention over an fp context plus new tokens, and the log-sum-exp merge of partial attentions.

Every cache path is built from these two pieces: attention over a context every new query may see, followed by
the new tokens causally; and ``merge`` to combine partial results computed over disjoint key sets (a quantized
prefix, an fp tail, streaming sinks). Both return the log-sum-exp so results merge exactly.

Shapes: ``q`` [T, Hq, D]; ``k``/``v`` [Hkv, S, D]; query head ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA).
"""

from __future__ import annotations

import torch


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_ctx: int, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[0, n_ctx)`` are visible to every query; key ``n_ctx + j`` is visible to query ``i`` iff ``j <= i``
    (so ``k`` holds either just the context, or the context followed by the T new tokens).

    Returns (out [T, Hq, D] in q's dtype, lse [T, Hq] float32), computed in float32. This is the reference path
    (CPU, tests, short fp segments on GPU); long contexts go through the kernels in this package.
    """
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    group = hq // hkv
    if s not in (n_ctx, n_ctx + t):
        raise ValueError(f"expected {n_ctx} context keys (+ {t} new keys), got {s}")
    if s == 0:  # nothing to attend to: a part that contributes no mass to ``merge``
        return torch.zeros_like(q), torch.full((t, hq), float("-inf"), device=q.device)
    qf = q.float().transpose(0, 1)  # [Hq, T, D]
    kf = k.float().repeat_interleave(group, dim=0)  # [Hq, S, D]
    vf = v.float().repeat_interleave(group, dim=0)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * sm_scale  # [Hq, T, S]
    if s > n_ctx and t > 1:
        i = torch.arange(t, device=q.device)[:, None]
        j = torch.arange(s, device=q.device)[None, :]
        scores = scores.masked_fill(j > n_ctx + i, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, T]
    out = torch.matmul(torch.exp(scores - lse[..., None]), vf)
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1).contiguous()


def merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets: weights are each part's share of the total softmax mass.
    An empty part has lse = -inf and weight 0."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    wb = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), lse
