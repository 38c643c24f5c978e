"""Fast retrieval-head scoring: rank KV heads by how much they attend to a needle while answering, in seconds.

The trained pattern (``duo_qserve.train_patterns``) costs minutes to hours; this is the quick alternative. Each
sample is a multi-passkey retrieval sample of the training task (passkeys hidden in real essays, then one question
and answer per passkey); one full-attention forward per sample. A KV head's score is the softmax mass that the
question/answer tokens put on the passkey tokens in the context that a streaming head would drop (outside sink +
recent), averaged over those queries and the head's query group. A head that fetches the passkey from far back
while the answer is written is what a retrieval head is; a head that merely looks far back on plain text need not
be. The result is written in the trained pattern's format, so the engine and ``patterns.sparsify`` use it
unchanged; only the ranking matters.

Run: ``python -m duo_qserve.score_patterns --model default --out DIR [--sink 16 --recent 64 --tokens 4000
--samples 8]``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import numpy as np
import torch

from duo_qserve.data import PasskeyRetrieval, Sample, SampleFn
from duo_qserve.loading import load_model
from duo_qserve.model import CausalAttention, Transformer
from duo_qserve.patterns import save_pattern
from duo_qserve.train_patterns import TrainSettings


class NeedleMassProbe(CausalAttention):
    """A "cache" for one full-attention forward that records, per KV head, the attention mass of the ``queries``
    rows on the ``needle`` keys outside the streaming window. Only those rows' scores are formed ([Hq, R, T]); the
    forward itself is ``CausalAttention``'s."""

    def __init__(
        self, n_layers: int, n_kv_heads: int, sample: Sample, sink: int, recent: int,
        device: torch.device | str = "cpu",
    ):  # fmt: skip
        self.rows = sample.supervised.nonzero()[:, 0].to(device)
        i, j = self.rows[:, None], torch.arange(len(sample.ids), device=device)[None, :]
        dropped = (j >= sink) & (j <= i - recent)  # what a streaming head does not see
        self.target = sample.needle.to(device)[None, :] & dropped  # [R, T]
        self.causal_mask = j <= i
        self.scores = torch.zeros(n_layers, n_kv_heads, dtype=torch.float64, device=device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = q.shape[1] // k.shape[1]
        qh, kh, vh = self.heads(q, k, v)
        scale = 1 / math.sqrt(q.shape[-1])
        scores = (qh[:, self.rows].float() @ kh.float().transpose(1, 2)) * scale  # [Hq, R, T]
        probs = torch.softmax(scores.masked_fill(~self.causal_mask, float("-inf")), dim=-1)
        mass = (probs * self.target).sum(-1).mean(-1)  # [Hq]
        self.scores[layer] += mass.view(-1, g).mean(-1).double()
        return self.causal(qh, kh, vh)


@torch.no_grad()
def score_heads(
    model: Transformer, make_sample: SampleFn, n_samples: int, sink: int, recent: int, seed: int = 0
) -> np.ndarray:
    """Mean needle mass per KV head [layers, kv_heads] over ``n_samples`` samples."""
    a = model.args
    device = next(model.parameters()).device
    rng, total = random.Random(seed), np.zeros((a.n_layers, a.n_kv_heads))
    for _ in range(n_samples):
        sample = make_sample(rng)
        probe = NeedleMassProbe(a.n_layers, a.n_kv_heads, sample, sink, recent, device)
        model.hidden_states(sample.ids.to(device), probe)
        total += probe.scores.cpu().numpy()
    return total / n_samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m duo_qserve.score_patterns", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="default")
    p.add_argument("--out", required=True, help="pattern directory to write")
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--tokens", type=int, default=4000, help="haystack tokens per sample")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--passkeys", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--essays", default=None, help="directory of *.txt essays (default: $DUO_QSERVE_ESSAYS)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    loaded = load_model(a.model, a.device)
    task = TrainSettings(
        context_length_min=a.tokens, context_length_max=a.tokens, num_passkeys=a.passkeys, passkey_length=5
    )
    make_sample = PasskeyRetrieval(loaded.tokenizer, task, a.essays)
    gates = score_heads(loaded.model, make_sample, a.samples, a.sink, a.recent, a.seed)
    config = dict(
        model_name=loaded.name, method="needle attention mass of the answers (score_patterns)",
        sink_size=a.sink, recent_size=a.recent, tokens=a.tokens, samples=a.samples, num_passkeys=a.passkeys,
        seed=a.seed, dataset_name=task.dataset_name,
    )  # fmt: skip
    save_pattern(a.out, gates, config)
    print(
        f"wrote {a.out}: score mean {gates.mean():.3f}, min {gates.min():.3f}, max {gates.max():.3f}; "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
