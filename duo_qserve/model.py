"""The Llama-family transformer (Llama 2/3/3.1, Mistral, SmolLM2, Qwen2/2.5) in one readable file.

Batch size is 1 and tensors are ``[tokens, ...]``: this engine serves one long document at a time, and dropping the
batch axis keeps every shape obvious. Module names follow Hugging Face checkpoints (minus the ``model.`` prefix) so
state dicts load without a mapping table.

The model never sees the KV-cache layout: each attention layer hands its post-RoPE ``q, k, v`` to
``cache.attend(layer, q, k, v)``, which stores ``k, v`` however it likes and returns the attention output (or,
for a cache that rotates them itself, the pre-RoPE ones and the RoPE tables: ``KVCache``). Linear
layers and norms are plain modules that quantization swaps in place (``duo_qserve.quant.w8a8``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from duo_qserve.kernels.attention import apply_rope


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", "factor": ..., ...}
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v, none on o_proj: Qwen2 (whose config has no key for it)
    extra: dict = field(default_factory=dict)  # bos/eos ids etc. carried from the checkpoint's config

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(PRESETS))}")
        return cls(**copy.deepcopy(PRESETS[key]))  # a fresh `extra` dict per model

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """Read a Hugging Face ``config.json`` (transformers 4.x ``rope_scaling`` or 5.x ``rope_parameters``)."""
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or rope or None
        if scaling:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None
        n_heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=cfg.get("model_type") == "qwen2",
            extra={k: cfg[k] for k in ("bos_token_id", "eos_token_id", "model_type") if k in cfg},
        )

    def to_hf_config(self) -> dict:
        """The equivalent transformers config keys (used to build reference models in tests): ``Qwen2Config``'s
        when ``extra["model_type"]`` is "qwen2", else ``LlamaConfig``'s."""
        kind = self.extra.get("model_type", "llama")
        cfg = {
            "model_type": kind,
            "architectures": ["Qwen2ForCausalLM" if kind == "qwen2" else "LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
        }
        if self.attention_bias != (kind == "qwen2"):
            raise ValueError(
                f"q/k/v biases (attention_bias={self.attention_bias}) exist in transformers only as Qwen2; "
                f"model_type is {kind!r}"
            )
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        cfg.update(self.extra)
        return cfg

    def as_dict(self) -> dict:
        return asdict(self)


# Shapes for synthetic benchmark models and the capacity planner (weights are random: benchmarks only).
PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "llama-2-7b": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
        intermediate_size=11008, rope_theta=10000.0, max_position_embeddings=4096,
    ),
    "mistral-7b": dict(
        vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        intermediate_size=14336, rope_theta=1000000.0, max_position_embeddings=32768,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        intermediate_size=1536, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "qwen2.5-coder-0.5b": dict(
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64, intermediate_size=4864,
        norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
        attention_bias=True, extra={"model_type": "qwen2"},
    ),
    "qwen2.5-coder-1.5b": dict(
        vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128, intermediate_size=8960,
        norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True,
        attention_bias=True, extra={"model_type": "qwen2"},
    ),
}  # fmt: skip


class KVCache(Protocol):
    """What the model needs from a cache. Implementations live in ``duo_qserve.cache``, and ``CausalAttention``
    below for forwards that keep nothing.

    A cache may set ``rotates_qk = True``: it then gets q, k before RoPE and the cos/sin tables,
    ``attend(layer, q, k, v, rope)``, and rotates them itself (the graph-safe decode step fuses RoPE into its
    attention kernel, ``duo_qserve.kernels.decode_step``)."""

    seq_len: int  # tokens already stored (the position of the next token)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k, v`` [T, n_kv_heads, D] after the tokens held and return attention of ``q`` [T, n_heads, D]
        over everything held (causal within the new tokens): [T, n_heads, D]."""
        ...

    def advance(self, n_tokens: int) -> None:
        """Called once per forward, after every layer has attended: ``n_tokens`` more are now held."""
        ...


class CausalAttention:
    """A ``KVCache`` that keeps nothing: causal attention within the tokens of each forward, which therefore
    always starts at position 0. For whole-sequence forwards that need no past (calibration, the teacher of pattern
    training); a subclass that records or mixes attention overrides ``attend`` and reuses ``heads`` and
    ``causal``."""

    seq_len = 0

    @staticmethod
    def heads(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k/v [T, Hkv, D] -> each [Hq, T, D], every KV head repeated for its query heads."""
        g = q.shape[1] // k.shape[1]
        return (
            q.transpose(0, 1),
            k.transpose(0, 1).repeat_interleave(g, 0),
            v.transpose(0, 1).repeat_interleave(g, 0),
        )

    @staticmethod
    def causal_heads(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        """Causal attention of ``heads``' output, [Hq, T, D]. (4-D inputs: SDPA's flash and memory-efficient kernels
        take no others, and the fallback's [H, T, T] scores need 52 GB at 33K tokens.)"""
        return F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True)[0]

    @classmethod
    def causal(cls, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        """``causal_heads``, back as [T, Hq, D]."""
        return cls.causal_heads(qh, kh, vh).transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.causal(*self.heads(q, k, v))

    def advance(self, n_tokens: int) -> None:
        pass


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies in float64, with linear or llama3 scaling applied."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    s = args.rope_scaling
    if not s:
        return inv
    kind = s["rope_type"]
    if kind == "linear":
        return inv / s["factor"]
    if kind == "llama3":
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old_ctx = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        mid = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(
            wavelen > old_ctx / lo, inv / factor, torch.where(wavelen < old_ctx / hi, inv, mid)
        )
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: linear, llama3")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, D/2] in float32, computed in float64: at positions in the millions a float32
    ``pos * inv_freq`` is off by up to half a radian for the fastest channels."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def project(x, *linears: nn.Module) -> list[torch.Tensor]:
    """``[linear(x) for linear in linears]`` for linears that read the same input. Linears of one type that
    define ``forward_group`` run together (W8A8: one quantization of x, one launch at batch 1)."""
    group = getattr(type(linears[0]), "forward_group", None)
    if group is not None and all(type(lin) is type(linears[0]) for lin in linears):
        return group(x, list(linears))
    return [lin(x) for lin in linears]


def add_linear(residual: torch.Tensor, linear: nn.Module, x) -> torch.Tensor:
    """``residual + linear(x)``. Linears that take a ``residual`` (W8A8) add it in their epilogue: at batch 1 that
    saves a launch and a pass over the hidden state, twice per layer."""
    if getattr(linear, "adds_residual", False):
        return linear(x, residual=residual)
    return residual + linear(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = (
            layer,
            args.n_heads,
            args.n_kv_heads,
            args.head_dim,
        )
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self, x, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache, residual: torch.Tensor
    ) -> torch.Tensor:
        """``residual`` + attention of the normed ``x``."""
        t = rope[0].shape[0]  # x may be a quantized activation (W8A8), so take T from the positions
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(t, self.n_heads, self.head_dim)
        k = k.view(t, self.n_kv_heads, self.head_dim)
        v = v.view(t, self.n_kv_heads, self.head_dim)
        if getattr(cache, "rotates_qk", False):
            out = cache.attend(self.layer, q, k, v, rope)
        else:
            out = cache.attend(self.layer, apply_rope(q, *rope), apply_rope(k, *rope), v)
        return add_linear(residual, self.o_proj, out.reshape(t, self.n_heads * self.head_dim))


class SiluAndMul(nn.Module):
    """A module (not a function) so W8A8 can swap it for a fused SiLU*up+quantize kernel."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.dim, bias=False)
        self.act = SiluAndMul()

    def forward(self, x, residual: torch.Tensor) -> torch.Tensor:
        """``residual`` + the MLP of the normed ``x``."""
        return add_linear(residual, self.down_proj, self.act(*project(x, self.gate_proj, self.up_proj)))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, rope, cache: KVCache) -> torch.Tensor:
        x = self.self_attn(self.input_layernorm(x), rope, cache, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # A plain attribute, not a buffer: ``model.half()`` would round a buffer's float64 frequencies.
        self.inv_freq = rope_inv_freq(args)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        recompute: bool = False,
    ):
        """Final normed hidden states [T, dim] of ``input_ids`` [T], appended to ``cache``. ``recompute`` (for
        training): autograd keeps only each block's input and recomputes the block in the backward pass, so a
        backward at 32K tokens holds one block's activations instead of every block's."""
        if positions is None:
            positions = torch.arange(
                cache.seq_len, cache.seq_len + input_ids.shape[0], device=input_ids.device
            )
        rope = rope_cos_sin(self.inv_freq.to(input_ids.device), positions)
        h = self.embed_tokens(input_ids)
        for block in self.layers:
            h = checkpoint(block, h, rope, cache, use_reentrant=False) if recompute else block(h, rope, cache)
        cache.advance(input_ids.shape[0])
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits in float32: [T, vocab], or [1, vocab] with ``last_only`` (pre-fill needs only the last row, and
        a 32K-token chunk of full logits would cost gigabytes)."""
        h = self.hidden_states(input_ids, cache)
        if last_only:
            h = h[-1:]
        return self.lm_head(h).float()
