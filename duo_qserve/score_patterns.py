"""Fast retrieval-head scoring: rank KV heads by how much attention they pay outside sink + recent, in seconds.

The trained pattern (``duo_qserve.train_patterns``) costs minutes to hours; this is the quick alternative. One
forward pass over real text (Paul Graham essays) per sample; for each KV head the score is the mean, over query
positions past ``sink + recent`` and over the head's query group, of the softmax mass on keys a streaming head would
drop (``sink <= key <= query - recent``). A head that looks far back scores high. The result is written in the
trained pattern's format, so the engine and ``patterns.sparsify`` use it unchanged; only the ranking matters.

Run: ``python -m duo_qserve.score_patterns --model default --out DIR [--sink 16 --recent 64 --tokens 2048
--samples 2]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from duo_qserve.loading import load_model
from duo_qserve.model import Transformer
from duo_qserve.patterns import save_pattern
from duo_qserve.train_patterns import HAYSTACK_DIR, streaming_mask


class DroppedMassProbe:
    """A "cache" for one full-attention forward that records each KV head's attention mass outside the
    streaming window (chunked over queries so the [Hq, T, T] scores never exist at once)."""

    def __init__(
        self, n_layers: int, n_kv_heads: int, q_per_kv: int, sink: int, recent: int, block: int = 512
    ):
        self.q_per_kv, self.sink, self.recent, self.block = q_per_kv, sink, recent, block
        self.seq_len = 0
        self.scores = torch.zeros(n_layers, n_kv_heads, dtype=torch.float64)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, hq, d = q.shape
        g = self.q_per_kv
        qh = q.float().transpose(0, 1)
        kh = k.float().transpose(0, 1).repeat_interleave(g, 0)
        vh = v.float().transpose(0, 1).repeat_interleave(g, 0)
        first = self.sink + self.recent  # earlier queries drop nothing
        outs, dropped = [], torch.zeros(hq, dtype=torch.float64, device=q.device)
        for s in range(0, t, self.block):
            e = min(s + self.block, t)
            scores = (qh[:, s:e] @ kh[:, :e].transpose(1, 2)) / math.sqrt(d)
            rows = torch.arange(s, e, device=q.device)[:, None]
            cols = torch.arange(e, device=q.device)[None, :]
            probs = torch.softmax(scores.masked_fill(cols > rows, float("-inf")), dim=-1)
            outs.append(probs @ vh[:, :e])
            keep = streaming_mask(e, self.sink, self.recent, q.device)[s:e] | (cols > rows)
            far = (probs * ~keep).sum(-1)[:, rows[:, 0] >= first]  # [Hq, queries past the window]
            dropped += far.sum(-1).double()
        n_queries = max(t - first, 1)
        self.scores[layer] += (dropped / n_queries).view(-1, g).mean(-1).cpu()
        return torch.cat(outs, dim=1).transpose(0, 1).to(q.dtype)

    def advance(self, n_tokens: int) -> None:
        self.seq_len += n_tokens


@torch.no_grad()
def score_heads(model: Transformer, samples: list[torch.Tensor], sink: int, recent: int) -> np.ndarray:
    """Mean dropped attention mass per KV head [layers, kv_heads], averaged over the samples."""
    a = model.args
    total = np.zeros((a.n_layers, a.n_kv_heads))
    for ids in samples:
        probe = DroppedMassProbe(a.n_layers, a.n_kv_heads, a.q_per_kv, sink, recent)
        model.hidden_states(ids, probe)
        total += probe.scores.numpy()
    return total / len(samples)


def haystack_samples(
    tokenizer, n_tokens: int, n_samples: int, haystack_dir: Path = HAYSTACK_DIR
) -> list[torch.Tensor]:
    """``n_samples`` disjoint windows of ``n_tokens`` tokens of the essays, each starting with BOS if the model has one."""
    files = sorted(Path(haystack_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no haystack essays (*.txt) in {haystack_dir}")
    ids = tokenizer("\n\n".join(f.read_text(errors="replace") for f in files), add_special_tokens=False)[
        "input_ids"
    ]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    n = n_tokens - len(bos)
    if len(ids) < n * n_samples:
        raise ValueError(f"the haystack has {len(ids)} tokens, fewer than {n_samples} x {n}")
    return [torch.tensor(bos + ids[i * n : (i + 1) * n]) for i in range(n_samples)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m duo_qserve.score_patterns", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="default")
    p.add_argument("--out", required=True, help="pattern directory to write")
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per sample")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--haystack-dir", default=str(HAYSTACK_DIR), help="directory of *.txt essays")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    loaded = load_model(a.model, a.device)
    samples = [
        s.to(a.device) for s in haystack_samples(loaded.tokenizer, a.tokens, a.samples, Path(a.haystack_dir))
    ]
    gates = score_heads(loaded.model, samples, a.sink, a.recent)
    config = dict(
        model_name=loaded.name, method="dropped attention mass (score_patterns)", sink_size=a.sink,
        recent_size=a.recent, tokens=a.tokens, samples=a.samples, dataset_name="paul_graham_essays",
    )  # fmt: skip
    save_pattern(a.out, gates, config)
    print(
        f"wrote {a.out}: score mean {gates.mean():.3f}, min {gates.min():.3f}, max {gates.max():.3f}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
