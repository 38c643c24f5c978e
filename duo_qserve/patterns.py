"""Attention patterns: which KV heads are retrieval heads (full cache) and which are streaming heads.

The on-disk format is the reference one: a directory with ``full_attention_heads.tsv`` (one row per layer, one
gate value per KV head, tab-separated floats; higher = needs the full context) and ``config.json`` (at least
``sink_size`` and ``recent_size``). A directory holding exactly one such pattern directory is accepted too, as the
reference repository nests them (``<model>/lr=...-multi_passkey10/``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from duo_qserve.model import ModelArgs

GATES_FILE = "full_attention_heads.tsv"


class PatternError(ValueError):
    """A pattern that cannot be read or does not fit the model."""


@dataclass
class AttentionPattern:
    gates: np.ndarray  # [layers, kv_heads], clipped to [0, 1]
    sink_size: int = 64
    recent_size: int = 256
    config: dict = field(default_factory=dict)
    source: str = ""
    learned: bool = (
        True  # False for the all-retrieval stand-in: with no gates, no head can be chosen to stream
    )

    @property
    def name(self) -> str:
        return self.source or "unnamed pattern"

    def check_fits(self, args: ModelArgs) -> None:
        want = (args.n_layers, args.n_kv_heads)
        if self.gates.shape != want:
            raise PatternError(
                f"pattern {self.name} has {self.gates.shape[0]} layers x {self.gates.shape[1]} KV heads, but the "
                f"model has {want[0]} layers x {want[1]} KV heads: use a pattern made for this model"
            )

    def retrieval_mask(self, sparsity: float) -> tuple[np.ndarray, float]:
        if not self.learned:
            return np.ones(self.gates.shape, dtype=bool), 0.0
        return sparsify(self.gates, sparsity)


def find_pattern_dir(path: str | Path) -> Path:
    p = Path(path)
    if (p / GATES_FILE).is_file():
        return p
    if p.is_dir():
        found = sorted(d for d in p.iterdir() if (d / GATES_FILE).is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise PatternError(f"{p} holds several patterns ({', '.join(d.name for d in found)}): name one")
    raise PatternError(f"no attention pattern at {p}: expected a directory with {GATES_FILE} and config.json")


def load_pattern(path: str | Path) -> AttentionPattern:
    d = find_pattern_dir(path)
    try:
        gates = np.loadtxt(d / GATES_FILE, dtype=np.float64, delimiter="\t", ndmin=2)
    except ValueError as e:
        raise PatternError(f"{d / GATES_FILE} is not a tab-separated table of numbers ({e})") from None
    if not np.isfinite(gates).all():
        raise PatternError(f"{d / GATES_FILE} holds non-finite values")
    cfg_path = d / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    return AttentionPattern(
        gates=np.clip(gates, 0.0, 1.0),  # training leaves tiny negatives after the last step
        # deploy_* (when set) are the windows to serve with; sink_size/recent_size are the ones trained with
        sink_size=int(config.get("deploy_sink_size") or config.get("sink_size", 64)),
        recent_size=int(config.get("deploy_recent_size") or config.get("recent_size", 256)),
        config=config,
        source=str(d),
    )


def save_pattern(path: str | Path, gates: np.ndarray, config: dict) -> Path:
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    np.savetxt(d / GATES_FILE, np.asarray(gates, dtype=np.float64), delimiter="\t", fmt="%.18e")
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return d


def sparsify(gates: np.ndarray, sparsity: float) -> tuple[np.ndarray, float]:
    """Make the ``sparsity`` fraction of all heads (global over layers) with the lowest gates streaming.

    Ties are broken by position (earlier layer/head first becomes streaming), so the same pattern and ratio always
    give the same heads. Returns (retrieval mask [layers, kv_heads] bool, achieved streaming ratio).
    """
    flat = np.asarray(gates, dtype=np.float64).ravel()
    n_stream = int(round(min(max(sparsity, 0.0), 1.0) * flat.size))
    order = np.argsort(flat, kind="stable")
    mask = np.ones(flat.size, dtype=bool)
    mask[order[:n_stream]] = False
    return mask.reshape(np.shape(gates)), n_stream / flat.size


UNIFORM_PATTERN_NAME = "none (full attention)"  # what the uniform pattern is called in stats and books


def random_pattern(args: ModelArgs, seed: int = 0) -> AttentionPattern:
    """Uniform random gates: the control that shows a learned pattern matters."""
    rng = np.random.default_rng(seed)
    return AttentionPattern(gates=rng.random((args.n_layers, args.n_kv_heads)), source=f"random(seed={seed})")


def uniform_pattern(args: ModelArgs) -> AttentionPattern:
    """Every head a retrieval head, whatever the ratio asked: plain full attention, for models with no pattern."""
    return AttentionPattern(
        gates=np.ones((args.n_layers, args.n_kv_heads)), source=UNIFORM_PATTERN_NAME, learned=False
    )


@torch.no_grad()
def reorder_heads(model: nn.Module, mask: np.ndarray) -> list[int]:
    """Permute each layer's KV heads so retrieval heads come first (query heads and o_proj columns follow).

    Every tensor of q/k/v_proj whose first axis is the output axis (weights, int8 weights, per-channel scales) is
    permuted, so this works before or after W8A8 quantization. The model's function is unchanged. Returns the number
    of retrieval heads per layer.
    """
    args: ModelArgs = model.args
    g, d = args.q_per_kv, args.head_dim
    counts = []
    for layer, block in enumerate(model.layers):
        m = np.asarray(mask[layer], dtype=bool)
        perm = torch.as_tensor(np.concatenate([np.flatnonzero(m), np.flatnonzero(~m)]))
        kv_rows = (perm[:, None] * d + torch.arange(d)).reshape(-1)
        q_rows = (perm[:, None] * g * d + torch.arange(g * d)).reshape(-1)
        attn = block.self_attn
        for proj, rows in ((attn.q_proj, q_rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
            for t in list(proj.parameters(recurse=False)) + list(proj.buffers(recurse=False)):
                if t.dim() >= 1 and t.shape[0] == rows.numel():
                    t.copy_(t[rows.to(t.device)])
        w = attn.o_proj.weight
        w.copy_(w[:, q_rows.to(w.device)])
        counts.append(int(m.sum()))
    return counts
