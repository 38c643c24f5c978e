"""Dense attention over an fp context plus new tokens, and the log-sum-exp merge of partial attentions.

Every cache path is built from these two pieces: attention over a context every new query may see, followed by
the new tokens causally; and ``merge`` to combine partial results computed over disjoint key sets (a quantized
prefix, an fp tail, streaming sinks). Both return the log-sum-exp so results merge exactly.

Shapes: ``q`` [T, Hq, D]; ``k``/``v`` [Hkv, S, D]; query head ``h`` reads kv head ``h // (Hq // Hkv)`` (GQA).
"""

from __future__ import annotations

import torch


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_ctx: int, sm_scale: float, kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[0, n_ctx)`` are visible to every query; key ``n_ctx + j`` is visible to query ``i`` iff ``j <= i``
    (so ``k`` holds either just the context, or the context followed by the T new tokens).

    Returns (out [T, Hq, D] in q's dtype, lse [T, Hq] float32). On CUDA (fp16/bf16) it runs the fused kernels
    behind SDPA (``fused_attention``, which ``kernel`` is passed to), which never materialize the [T, S] scores;
    elsewhere the float32 reference.
    """
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    if s not in (n_ctx, n_ctx + t):
        raise ValueError(f"expected {n_ctx} context keys (+ {t} new keys), got {s}")
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and s:
        return _fused_parts(q, k, v, n_ctx, sm_scale, kernel)
    return reference(q, k, v, n_ctx, sm_scale)


def _fused_parts(q, k, v, n_ctx: int, sm_scale: float, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Context part (non-causal) and new part (causal, square) through ``fused_attention``, merged by lse: the
    kernels' own causal mask is top-left aligned, so a context before the new tokens needs the split.

    The context part folds each KV head's query group into the query axis, so a long context is read once and
    never copied per query head; the new part (at most one chunk) repeats its K/V per query head instead."""
    t, hq, d = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    parts = []
    if n_ctx:
        qf = q.view(t, hkv, group, d).permute(1, 0, 2, 3).reshape(1, hkv, t * group, d)
        out, lse = fused_attention(qf, k[None, :, :n_ctx], v[None, :, :n_ctx], False, sm_scale, kernel)
        out = out.view(hkv, t, group, d).permute(1, 0, 2, 3).reshape(t, hq, d)
        parts.append((out, lse.view(hkv, t, group).permute(1, 0, 2).reshape(t, hq)))
    if k.shape[1] > n_ctx:
        kh = k[:, n_ctx:].repeat_interleave(group, 0)[None]
        vh = v[:, n_ctx:].repeat_interleave(group, 0)[None]
        out, lse = fused_attention(q.transpose(0, 1)[None], kh, vh, True, sm_scale, kernel)
        parts.append((out[0].transpose(0, 1), lse[0].transpose(0, 1)))
    return parts[0] if len(parts) == 1 else merge(*parts[0], *parts[1])


CUDNN_MIN_QUERIES = 256  # below this (decode steps, short questions) the flash kernel


def fused_attention(
    q, k, v, causal: bool, sm_scale: float, kernel: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, H, T, D] inputs -> (out [1, H, T, D], lse [1, H, T] float32, natural log), through PyTorch's fused
    kernels: cuDNN for pre-fill-sized query counts (the faster one there), flash for a few queries. ``kernel``:
    "auto", "cudnn", "flash"."""
    if kernel == "auto":
        big = q.shape[2] >= CUDNN_MIN_QUERIES and q.shape[-1] <= 128
        kernel = "cudnn" if big and torch.backends.cudnn.is_available() else "flash"
    if kernel == "cudnn":
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=sm_scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=sm_scale
        )[:2]
    return out, lse.reshape(out.shape[:3]).float()


def reference(q, k, v, n_ctx: int, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 attention with an explicit mask: the oracle for every attention path."""
    t, hq, d = q.shape
    hkv, s, _ = k.shape
    group = hq // hkv
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face convention) on x [T, H, D]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def split_heads(n_retrieval: int, layer: int, q, k, v, retrieval, streaming) -> torch.Tensor:
    """Send KV heads ``[0, n_retrieval)`` (and their query heads) to ``retrieval``, the rest to ``streaming``:
    head reordering made both contiguous ranges. k/v arrive [T, Hkv, D] and leave [Hkv, T, D]. Both return the
    output [T, H, D] of their query heads, or (output, lse [T, H]); the two are joined along the heads."""
    g = q.shape[1] // k.shape[1]
    k, v = k.transpose(0, 1), v.transpose(0, 1)
    parts = []
    if n_retrieval:
        parts.append(retrieval(layer, q[:, : n_retrieval * g], k[:n_retrieval], v[:n_retrieval]))
    if n_retrieval < k.shape[0]:
        parts.append(streaming(layer, q[:, n_retrieval * g :], k[n_retrieval:], v[n_retrieval:]))
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(pair, dim=1) for pair in zip(*parts, strict=True))
    return torch.cat(parts, dim=1)
