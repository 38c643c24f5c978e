"""W8A8 GEMM: ``out[m, n] = (x_q[m] . w_q[n]) * x_scale[m] * w_scale[n]``, int8 inputs, int32 accumulation.

Three regimes, each tuned separately:

- pre-fill (M > 16): 128/256-row tiles on the int8 tensor cores, grouped tile order so row tiles reuse each
  weight tile from L2, both scales applied in the epilogue so the int32 accumulator never reaches memory;
- decode, M = 1 (batch-1 decode steps): ``_w8a8_gemv_kernel``, no tensor cores: weight rows read as int32 words and
  reduced with ``dp4a``, since at one row the step is bound by streaming the weight, which 16-row tensor-core
  tiles do poorly; one launch serves up to three weights that read the same x (``w8a8_matmul_group``: q/k/v,
  gate/up), since a 4 MB weight alone is too small to stream at full speed;
- 2 <= M <= 16 (which ``torch._int_mm`` refuses): the tile kernel with 16-row tiles and narrow N tiles,
  memory-bound, so the redundant MMA rows are free.

The weight stays in nn.Linear layout ``[N, K]`` (K contiguous), the layout QServe checkpoints use.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETED, use_triton

DECODE_MAX_M = 16
# One tuning per power-of-two row count up to this, and one for every longer input: a document's pre-fill chunks (up
# to 32K rows) then share a single tuning instead of each new length paying its own, and the warm-up can tune them
# all (``tuned_row_counts``) before the first question.
TUNE_MAX_M = 4096


def tuned_row_counts() -> tuple[int, ...]:
    """The row counts that each have their own GEMM tuning (the smallest of each bucket): 2, 4, ..., TUNE_MAX_M."""
    return tuple(2**i for i in range(1, TUNE_MAX_M.bit_length()))


def _tune_timer(fn, quantiles):
    """The autotuner's timer, with 5 ms of warm-up and 20 ms of repeats instead of Triton's 25 and 100: a kernel of
    well under a millisecond still runs dozens of times per config, and tuning every bucket at warm-up costs a
    fifth of the time."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


@triton.jit
def _w8a8_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, bias_ptr, res_ptr,
    M, N, K, m_bucket,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
):  # fmt: skip
    # m_bucket only keys the autotuner (see TUNE_MAX_M).
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(n_tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Wrap out-of-range rows/cols onto valid ones instead of masking: loads stay unmasked along M and N, and
    # the duplicate results are dropped by the store mask.
    x_ptrs = x_ptr + (rows % M)[:, None] * stride_xm + ks[None, :]
    w_ptrs = w_ptr + (cols % N)[:, None] * stride_wn + ks[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0)
        w = tl.load(w_ptrs, mask=k_ok[None, :], other=0)
        acc = tl.dot(x, tl.trans(w), acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    xs = tl.load(xs_ptr + rows, mask=rows < M, other=0.0)
    ws = tl.load(ws_ptr + cols, mask=cols < N, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * stride_om + cols[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:  # res has out's layout
        out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot4(a, b, acc, ASM: tl.constexpr):
    """``acc`` plus the dot product of the four int8 lanes of each int32 word pair: one ``dp4a`` instruction on
    the GPU; shifts and multiplies where inline PTX cannot run (the interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc], dtype=tl.int32, is_pure=True, pack=1
        )
    for i in tl.static_range(4):
        acc += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
    return acc


@triton.jit
def _w8a8_gemv_kernel(
    x_ptr, xs_ptr, w0_ptr, ws0_ptr, b0_ptr, out0_ptr, w1_ptr, ws1_ptr, b1_ptr, out1_ptr,
    w2_ptr, ws2_ptr, b2_ptr, out2_ptr, res_ptr,
    n0, n1, n2, K4,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
):  # fmt: skip
    """M = 1: ``BLOCK_N`` weight rows per program, read as int32 words (4 codes each) and reduced with dp4a into
    an elementwise int32 accumulator that is summed once at the end. No tensor cores (a 1-row product would pad
    to 16), tiny register use, so many programs per SM keep enough loads in flight to stream the weight.

    One launch serves up to three weights [n_i, 4 * K4] that read the same x (q/k/v, gate/up): the first
    cdiv(n0, BLOCK_N) programs take rows of w0, the next cdiv(n1, BLOCK_N) rows of w1, the rest rows of w2.
    ``HAS_BIAS``: each weight's bias ``b_i`` [n_i] is added (Qwen2's q/k/v). ``HAS_RES`` (one weight only):
    ``res`` [n0] is added to the output, the residual add of o_proj and down_proj."""
    pid = tl.program_id(0)
    p0 = tl.cdiv(n0, BLOCK_N)
    p1 = p0 + tl.cdiv(n1, BLOCK_N)
    if pid < p0:
        w_ptr, ws_ptr, b_ptr, out_ptr, n, tile = w0_ptr, ws0_ptr, b0_ptr, out0_ptr, n0, pid
    elif pid < p1:
        w_ptr, ws_ptr, b_ptr, out_ptr, n, tile = w1_ptr, ws1_ptr, b1_ptr, out1_ptr, n1, pid - p0
    else:
        w_ptr, ws_ptr, b_ptr, out_ptr, n, tile = w2_ptr, ws2_ptr, b2_ptr, out2_ptr, n2, pid - p1
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    last = tl.minimum(rows, n - 1)  # clamped: duplicates dropped at the store
    w_rows = w_ptr + last[:, None] * K4
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for k in range(0, K4, BLOCK_K):
        k_ok = k + ks < K4
        x = tl.load(x_ptr + k + ks, mask=k_ok, other=0)
        w = tl.load(w_rows + k + ks[None, :], mask=k_ok[None, :], other=0)
        acc = _dot4(w, tl.broadcast_to(x[None, :], (BLOCK_N, BLOCK_K)), acc, ASM)
    dot = tl.sum(acc, 1).to(tl.float32)
    out = dot * tl.load(xs_ptr) * tl.load(ws_ptr + last)
    if HAS_BIAS:
        out += tl.load(b_ptr + last).to(tl.float32)
    if HAS_RES:
        out += tl.load(res_ptr + last).to(tl.float32)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=rows < n)


def _cfg(bm: int, bn: int, bk: int, group: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group}, num_stages=stages, num_warps=warps
    )


_PREFILL_CONFIGS = [
    _cfg(128, 256, 128, 8, 3, 8),
    _cfg(128, 128, 128, 8, 4, 8),
    _cfg(256, 128, 128, 8, 3, 8),
    _cfg(128, 128, 64, 8, 5, 4),
    _cfg(64, 128, 128, 8, 4, 4),
]
_DECODE_CONFIGS = [
    _cfg(16, 16, 512, 1, 4, 4),
    _cfg(16, 32, 256, 1, 5, 4),
    _cfg(16, 32, 512, 1, 4, 4),
    _cfg(16, 64, 256, 1, 4, 4),
    _cfg(16, 16, 1024, 1, 3, 4),
    _cfg(16, 64, 128, 1, 4, 4),
    _cfg(16, 128, 256, 1, 3, 8),
]
_GEMV_CONFIGS = [  # the best per Llama-3-8B shape in a sweep (o/qkv: 2-8 rows; gate_up/down: 1 row, long K)
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
    for bn, bk, w in [(2, 128, 1), (1, 256, 2), (1, 512, 1), (2, 256, 1), (4, 256, 8), (8, 128, 8)]
]
_prefill_gemm = triton.autotune(_PREFILL_CONFIGS, key=["m_bucket", "N", "K"], do_bench=_tune_timer)(
    _w8a8_gemm_kernel
)
_decode_gemm = triton.autotune(_DECODE_CONFIGS, key=["m_bucket", "N", "K"], do_bench=_tune_timer)(
    _w8a8_gemm_kernel
)
_gemv = triton.autotune(_GEMV_CONFIGS, key=["n0", "n1", "n2", "K4"], do_bench=_tune_timer)(_w8a8_gemv_kernel)


def _check(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8 or x_q.dim() != 2 or w_q.dim() != 2:
        raise ValueError(
            f"need 2-D int8 x_q and w_q, got {x_q.dtype} {tuple(x_q.shape)}, {w_q.dtype} {tuple(w_q.shape)}"
        )
    (m, k), (n, kw) = x_q.shape, w_q.shape
    if k != kw:
        raise ValueError(f"x_q [M, K] = {tuple(x_q.shape)} and w_q [N, K] = {tuple(w_q.shape)} disagree on K")
    if x_scale.numel() != m or w_scale.numel() != n:
        raise ValueError(f"need x_scale [M, 1] and w_scale [N]: M={m}, N={n}, got {tuple(x_scale.shape)}, "
                         f"{tuple(w_scale.shape)}")  # fmt: skip
    if residual is not None and tuple(residual.shape) != (m, n):
        raise ValueError(f"residual {tuple(residual.shape)} is not the output's shape {(m, n)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias {tuple(bias.shape)} is not [N] = {(n,)}")


def reference(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch. float64 holds every int8 dot product of K < 2^37 terms exactly, so this is exact integer
    accumulation followed by the scales (and the bias and residual), rounded once."""
    _check(x_q, x_scale, w_q, w_scale, residual, bias)
    out = (x_q.double() @ w_q.double().T) * x_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        out += bias.double()
    if residual is not None:
        out += residual.double()
    return out.to(out_dtype)


def _gemv_grid(n0: int, n1: int = 0, n2: int = 0):
    """The grid of ``_w8a8_gemv_kernel`` over weights of n0, n1, n2 rows, for a config's ``BLOCK_N``."""
    return lambda meta: (sum(triton.cdiv(n, meta["BLOCK_N"]) for n in (n0, n1, n2)),)


def _gemv_group(x_q, x_scale, weights, out_dtype, biases=None, residual=None) -> list[torch.Tensor]:
    """M = 1 through every (w_q, w_scale) of ``weights`` (and its bias, if ``biases``), three weights per launch;
    ``residual`` goes with a single weight."""
    x4 = x_q.contiguous().view(torch.int32)
    xs = x_scale.reshape(-1).float().contiguous()
    unread = x4  # the pointer passed for an absent bias or residual: no program reads it
    res = unread if residual is None else residual.contiguous()
    outs = []
    for i in range(0, len(weights), 3):
        group = [
            (
                w.contiguous().view(torch.int32),
                s.reshape(-1).float().contiguous(),
                unread if biases is None else biases[i + j].contiguous(),
                torch.empty((1, w.shape[0]), dtype=out_dtype, device=x_q.device),
            )
            for j, (w, s) in enumerate(weights[i : i + 3])
        ]
        outs += [part[-1] for part in group]
        rows = [part[0].shape[0] for part in group] + [0] * (3 - len(group))
        group += [group[0]] * (3 - len(group))  # pointers for the absent parts: no program reads them
        args = (x4, xs, *(t for part in group for t in part), res, *rows, x4.shape[1])
        _launch(
            _gemv, _gemv_grid(*rows), args, ASM=not INTERPRETED, HAS_BIAS=biases is not None,
            HAS_RES=residual is not None,
        )  # fmt: skip
    return outs


def _triton(x_q, x_scale, w_q, w_scale, out_dtype, residual, bias) -> torch.Tensor:
    (m, k), n = x_q.shape, w_q.shape[0]
    if m == 1 and k % 4 == 0:  # decode: the dp4a GEMV over int32 words
        biases = None if bias is None else [bias]
        return _gemv_group(x_q, x_scale, [(w_q, w_scale)], out_dtype, biases, residual)[0]
    x_q, w_q = x_q.contiguous(), w_q.contiguous()
    x_scale = x_scale.reshape(-1).float().contiguous()
    w_scale = w_scale.reshape(-1).float().contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    res = out if residual is None else residual.contiguous()  # out: a pointer no program reads
    b = out if bias is None else bias.contiguous()
    tuned = _decode_gemm if m <= DECODE_MAX_M else _prefill_gemm
    args = (x_q, x_scale, w_q, w_scale, out, b, res, m, n, k, min(triton.next_power_of_2(m), TUNE_MAX_M),
            x_q.stride(0), w_q.stride(0), n)  # fmt: skip
    _launch(
        tuned,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        args,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
    )
    return out


def _launch(tuned, grid, args: tuple, **constexprs) -> None:
    """Autotuned on the GPU; under the interpreter (which cannot time configs) the config with the smallest tile,
    which has the most tiles and edges."""
    if INTERPRETED:
        cfg = min(
            tuned.configs, key=lambda c: math.prod(c.kwargs[x] for x in c.kwargs if x.startswith("BLOCK"))
        )
        tuned.fn[grid](*args, **cfg.kwargs, **constexprs)
    else:
        tuned[grid](*args, **constexprs)


def w8a8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float16,
    backend: str = "auto",
    residual: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_q int8 [M, K], x_scale fp32 [M, 1], w_q int8 [N, K], w_scale fp32 [N] or [1, N] -> [M, N] out_dtype,
    plus ``bias`` [N] and ``residual`` [M, N] if given (added in fp32 before the one rounding to out_dtype: a
    linear's bias and a transformer block's residual add, fused into the epilogue).

    ``backend``: "auto" (Triton on CUDA, the reference on CPU), "triton" or "reference".
    """
    _check(x_q, x_scale, w_q, w_scale, residual, bias)
    if use_triton(backend, x_q, INTERPRETED):
        return _triton(x_q, x_scale, w_q, w_scale, out_dtype, residual, bias)
    return reference(x_q, x_scale, w_q, w_scale, out_dtype, residual, bias)


def w8a8_matmul_group(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    weights: list[tuple[torch.Tensor, torch.Tensor]],
    out_dtype: torch.dtype = torch.float16,
    backend: str = "auto",
    biases: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``[w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype, bias=b) ...]`` for the linears that read one input
    (q/k/v, gate/up), with ``biases`` one per weight or None. At M = 1 on the GPU one GEMV launch covers three
    weights: a launch that reads a 4 MB weight alone (Llama-3-8B's k or v) moves it at a third of copy
    bandwidth."""
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"{len(biases)} biases for {len(weights)} weights")
    each = [None] * len(weights) if biases is None else biases
    for (w_q, w_scale), bias in zip(weights, each, strict=True):
        _check(x_q, x_scale, w_q, w_scale, bias=bias)
    m, k = x_q.shape
    if m == 1 and k % 4 == 0 and use_triton(backend, x_q, INTERPRETED):
        return _gemv_group(x_q, x_scale, weights, out_dtype, biases)
    return [
        w8a8_matmul(x_q, x_scale, w_q, w_scale, out_dtype, backend, bias=bias)
        for (w_q, w_scale), bias in zip(weights, each, strict=True)
    ]
