"""Rotations that make W8A8 activations easier to quantize per token (QuaRot/SpinQuant-style), exact in float.

A per-token int8 scale is set by the token's largest channel, so a few outlier channels of the residual stream
crush every other channel to a handful of codes. Multiplying the residual stream by an orthogonal matrix ``R``
that mixes all channels spreads each outlier over the whole row. ``rotate_model`` folds that rotation into the
weights offline, so it costs nothing at run time and keeps the float model's function (test_rotation.py checks
it to rounding):

1. each RMSNorm gain is folded into the linears that read the norm's output (q/k/v, gate/up, lm_head), leaving
   unit gains; an RMSNorm with unit gain commutes with ``R`` because ``|x R| = |x|``;
2. the residual stream becomes ``h R``: embeddings ``E R``; linears reading it ``W R`` (weights are
   ``[out, in]``, rows of activations: ``y = x W^T``); linears writing it (o_proj, down_proj) ``R^T W``;
3. each value head is rotated by a Hadamard matrix and o_proj's input columns by the same (exact, since the
   attention output of a head is a weighted sum of its values): o_proj's input gets no outliers of its own;
4. down_proj's input (the MLP activation, no RMSNorm in front of it) gets an *online* Hadamard
   (``SiluMulHadamard``), with its inverse folded into down_proj's weight. It costs ``I b`` multiply-adds per
   token per layer (``I`` the intermediate size, ``b`` its Hadamard block), one matrix product: the only
   run-time cost of rotation.

Tied embeddings cannot stay tied: step 1 changes lm_head and not the embedding, so ``rotate_model`` unties them
(one extra ``vocab x dim`` matrix) and records it in ``model.args``.

Hadamard sizes: a Hadamard matrix of size ``n`` exists for ``n`` a power of two (Sylvester) but e.g. not for
SmolLM2's 576 = 64 x 9 or Qwen2.5-0.5B's 4864 = 256 x 19. The online transform is therefore blockwise: the
normalized Walsh-Hadamard of the largest power-of-two factor ``b`` of ``n`` on each of the ``n / b`` contiguous
blocks (``fast_hadamard``), which spreads an outlier over its block only. The offline residual rotation is free to
be any orthogonal matrix, so it mixes every channel: ``kron(Q, H_b) D``, a random orthogonal ``Q`` over the blocks,
the Hadamard within them, and random signs ``D`` (QuaRot's randomized Hadamard when ``n`` is a power of two).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from duo_qserve.kernels.hadamard import fast_hadamard, hadamard_block, hadamard_matrix
from duo_qserve.model import SiluAndMul


def residual_rotation(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal ``R`` [n, n] in float64 that mixes every channel: ``kron(Q, H_b) D`` with ``b`` the largest
    power-of-two factor of ``n``, ``Q`` a random orthogonal matrix over the ``n / b`` blocks (the Q of a Gaussian
    matrix's QR) and ``D`` random signs, both drawn from ``seed`` so the rotation is reproducible."""
    gen = torch.Generator().manual_seed(seed)
    b = hadamard_block(n)
    q, r = torch.linalg.qr(torch.randn(n // b, n // b, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))[None, :]  # the QR sign convention would otherwise bias Q
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return torch.kron(q.contiguous(), hadamard_matrix(b)) * signs[None, :]


class SiluMulHadamard(SiluAndMul):
    """``fast_hadamard(silu(gate) * up)``: the MLP activation of a rotated model, whose down_proj weight holds the
    inverse Hadamard. W8A8 swaps it for ``w8a8.SiluMulHadamardQuant``."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return fast_hadamard(super().forward(gate, up))


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Write float64 results back in the linear's own dtype."""
    linear.weight.copy_(weight.to(linear.weight.dtype))
    if bias is not None:
        linear.bias.copy_(bias.to(linear.bias.dtype))


def _untie(model: nn.Module) -> None:
    """Give lm_head its own copy of a tied embedding, and record it in ``model.args`` (a saved checkpoint must
    not re-tie them)."""
    if model.lm_head.weight is model.embed_tokens.weight:
        head = nn.Linear(model.args.dim, model.args.vocab_size, bias=False)
        head.weight = nn.Parameter(model.embed_tokens.weight.detach().clone(), requires_grad=False)
        model.lm_head = head.to(model.embed_tokens.weight.device)
    model.args = dataclasses.replace(model.args, tie_word_embeddings=False)


@torch.no_grad()
def fold_norm_gains(model: nn.Module) -> None:
    """Fold every RMSNorm gain into the linears reading the norm's output (``W diag(g)``) and set the gain to 1:
    the float model computes the same function. Unties tied embeddings first (see the module docstring)."""
    _untie(model)
    pairs = [(model.norm, [model.lm_head])]
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        pairs += [
            (block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            (block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
        ]
    for norm, linears in pairs:
        g = norm.weight.double()
        for lin in linears:
            _set(lin, lin.weight.double() * g[None, :])
        norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> None:
    """Rotate a float ``duo_qserve.model.Transformer`` in place (module docstring, steps 1-4): the same function
    up to float rounding, with activations that quantize better. Do it before ``quantize_model_w8a8``; sets
    ``model.rotation = {"seed": seed}``."""
    if getattr(model, "rotation", None) is not None:
        raise ValueError("the model is already rotated")
    fold_norm_gains(model)
    device = model.embed_tokens.weight.device
    r = residual_rotation(model.args.dim, seed).to(device)
    model.embed_tokens.weight.copy_(
        (model.embed_tokens.weight.double() @ r).to(model.embed_tokens.weight.dtype)
    )
    _set(model.lm_head, model.lm_head.weight.double() @ r)
    hd = model.args.head_dim

    def per_head(w: torch.Tensor) -> torch.Tensor:  # each head's hd channels of the last axis times H
        return fast_hadamard(w.reshape(-1, hd)).reshape(w.shape)

    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        for lin in (attn.q_proj, attn.k_proj, mlp.gate_proj, mlp.up_proj):
            _set(lin, lin.weight.double() @ r)
        v, o, down = attn.v_proj, attn.o_proj, mlp.down_proj
        # value rows: H W per head (H symmetric), bias too; o_proj's input columns: W H per head
        _set(v, per_head((v.weight.double() @ r).T).T, None if v.bias is None else per_head(v.bias.double()))
        _set(o, r.T @ per_head(o.weight.double()))
        _set(down, r.T @ fast_hadamard(down.weight.double()))  # undoes the online Hadamard of SiluMulHadamard
        mlp.act = SiluMulHadamard()
    model.rotation = {"seed": seed}
