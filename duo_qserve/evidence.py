"""Where an answer came from: the passages of the document that the retrieval heads attended to most.

One pass after the answer and nothing during it, so decoding is the same, token for token and in time, with or
without it. ``attention_mass`` puts the cache back at the document's checkpoint, pre-fills again what followed the
document (earlier turns and the question), then runs the tokens that produced the answer (the question's last
token and every answer token but the last) through the model once more with ``_MassProbe`` as its cache. Before
each layer's attention the probe takes those tokens' queries on the layer's retrieval heads, computes their
softmax over every key those heads hold (the document, what followed it, and the new tokens causally), and adds,
for each document token, the probability ``p`` it got (``mass``, divided by the number of (layer, head, query)
rows: its share of the retrieval heads' attention) and ``p**2`` (``focus``), each summed over heads, queries and
layers. Streaming heads see only the sink and the recent window, so they cannot say where in a book an answer
came from: left out.

Passages are ranked by ``focus``, not ``mass``: many rows spread their attention thinly over every copy of a
common token (" the" when the answer says "The") or over the text just before the question, and summed over a
window that thin attention outweighs the few sharp rows that read the fact; squared, a row counts by how much it
concentrates. On SmolLM2-135M with a planted 5-digit number in 2K tokens (3 haystacks x 5 depths) the top window
by focus held the needle in 14 of 15 documents, by mass in 4.

``top_passages`` picks the windows of ``PASSAGE_TOKENS`` tokens with the most focus (windows start every half
width, so a fact shorter than half a window lies whole in one; the chosen ones do not overlap), leaving out the
chat template's opening, which is the attention sink and not the book. ``describe`` names each passage's chapter
and cuts a snippet around its most attended token, for the app and its export.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from duo_qserve.cache import DuoKVCache

PASSAGE_TOKENS = 256
PASSAGES = 3
KEY_CHUNK = 4096  # document keys de-quantized and scored at a time (bounds the pass's memory)
SNIPPET_TOKENS = 48


class _MassProbe:
    """The cache the model sees during the probe forward: it attends through ``cache`` unchanged, and before each
    layer's attention adds the queries' retrieval-head attention on the first ``document_tokens`` positions to
    ``mass`` and its square to ``focus`` (``weight`` counts the softmax rows summed)."""

    def __init__(self, cache: DuoKVCache, document_tokens: int):
        self.cache, self.document_tokens = cache, document_tokens
        self.mass = torch.zeros(document_tokens, dtype=torch.float32, device=cache.device)
        self.focus = torch.zeros_like(self.mass)
        self.weight = 0

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    def advance(self, n_tokens: int) -> None:
        self.cache.advance(n_tokens)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_r = self.cache.n_retrieval[layer]
        if n_r:
            self._add_mass(layer, q, k, n_r)
        return self.cache.attend(layer, q, k, v)

    def _scores(self, layer: int, q: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return q @ self.cache.retrieval_keys(layer, start, end).transpose(1, 2)

    def _add_mass(self, layer: int, q: torch.Tensor, k: torch.Tensor, n_r: int) -> None:
        t, d = q.shape[0], q.shape[2]
        g = q.shape[1] // k.shape[1]
        # [n_r, g * t, d]: the query heads of each retrieval KV head, row = head-in-group * t + query
        q = q[:, : n_r * g].float().transpose(0, 1).reshape(n_r, g * t, d) * self.cache.sm_scale
        new = q @ k[:, :n_r].float().permute(1, 2, 0)  # [n_r, g * t, t] over the new tokens' keys
        query = torch.arange(t, device=q.device).repeat(g)
        new.masked_fill_(torch.arange(t, device=q.device)[None, :] > query[:, None], float("-inf"))
        lse = torch.logsumexp(new, dim=-1)
        held = self.cache.seq_len
        for a in range(0, held, KEY_CHUNK):
            lse = torch.logaddexp(
                lse, torch.logsumexp(self._scores(layer, q, a, min(a + KEY_CHUNK, held)), -1)
            )
        for a in range(0, self.document_tokens, KEY_CHUNK):
            b = min(a + KEY_CHUNK, self.document_tokens)
            p = torch.exp(self._scores(layer, q, a, b) - lse[..., None])
            self.mass[a:b] += p.sum(dim=(0, 1))
            self.focus[a:b] += p.square().sum(dim=(0, 1))
        self.weight += n_r * g * t


def attention_mass(
    model: torch.nn.Module,
    cache: DuoKVCache,
    document_tokens: int,
    context: Sequence[int],
    answer: Sequence[int],
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mass, focus) per document token while ``answer`` was produced, float32 [document_tokens] on the CPU:
    its share of the retrieval heads' attention (summing to at most 1: the rest went to ``context``) and the sum
    of its squared probabilities over the rows (see the module docstring).

    ``cache`` holds the document at its checkpoint (its first ``document_tokens`` positions); ``context`` is what
    the answer followed after the document (earlier turns, the question: at least one token). The cache is
    restored first and left holding ``context`` and all of ``answer`` but its last token, as after decoding it.
    """
    if not context or not answer:
        raise ValueError("attention_mass needs the context the answer followed and at least one answer token")
    cache.restore()
    ids = torch.tensor([*context, *answer[:-1]], dtype=torch.long, device=cache.device)
    lead = len(context) - 1  # tokens before the first query that produced an answer token
    for a in range(0, lead, chunk_size):
        model(ids[a : min(a + chunk_size, lead)], cache, last_only=True)
    probe = _MassProbe(cache, document_tokens)
    model(ids[lead:], probe, last_only=True)
    return (probe.mass / max(probe.weight, 1)).cpu(), probe.focus.cpu()


def top_passages(
    mass: torch.Tensor, focus: torch.Tensor, first: int, k: int = PASSAGES, width: int = PASSAGE_TOKENS
) -> list[dict[str, Any]]:
    """The ``k`` windows of ``width`` tokens from ``first`` on (windows start every ``width // 2`` tokens) with
    the most focus, none overlapping, best first: ``{"start", "end", "focus", "share", "peak"}`` in document
    positions, ``focus`` the window's share of the focus from ``first`` on (what they are ranked by, so it falls
    down the list), ``share`` its share of the attention (mass: it need not fall), ``peak`` its most focused
    token."""
    n, step = mass.shape[0], max(width // 2, 1)
    if first >= n:
        return []
    sums = torch.cat([torch.zeros(1, dtype=torch.float64), mass.double().cumsum(0)])
    ranks = torch.cat([torch.zeros(1, dtype=torch.float64), focus.double().cumsum(0)])
    windows = [(s, min(s + width, n)) for s in range(first, n, step)]
    windows = windows[: next((i + 1 for i, (_, e) in enumerate(windows) if e == n), len(windows))]
    total = max(float(ranks[n] - ranks[first]), 1e-30)
    order = sorted(windows, key=lambda w: float(ranks[w[1]] - ranks[w[0]]), reverse=True)
    chosen: list[tuple[int, int]] = []
    for s, e in order:
        if all(e <= cs or s >= ce for cs, ce in chosen):
            chosen.append((s, e))
            if len(chosen) == k:
                break
    return [
        {
            "start": s,
            "end": e,
            "focus": float(ranks[e] - ranks[s]) / total,
            "share": float(sums[e] - sums[s]),
            "peak": s + int(focus[s:e].argmax()),
        }
        for s, e in chosen
    ]


def passage_text(passage: dict[str, Any], document_ids: Sequence[int], tokenizer: Any) -> str:
    """The whole text of a passage from ``top_passages``."""
    return tokenizer.decode(list(document_ids[passage["start"] : passage["end"]]), skip_special_tokens=True)


def describe(
    passages: Sequence[dict[str, Any]],
    text_start: int,
    tokenizer: Any,
    document_ids: Sequence[int] | None = None,
    chapters: Sequence[tuple[str, int]] = (),
) -> list[dict[str, Any]]:
    """Passages from ``top_passages`` as a reader sees them, in their order: ``{"chapter", "position", "tokens",
    "focus", "share", "snippet"}``. ``position`` is the first token's offset in the book's text, as ``chapters`` (title, token
    offset) count them (``text_start``: the text's first position in the document's ids); the chapter is that of
    the most attended token. Without ``document_ids`` the snippet is empty."""
    out = []
    for p in passages:
        peak = p["peak"] - text_start
        chapter = next((title for title, offset in reversed(chapters) if offset <= peak), "")
        snippet = ""
        if document_ids is not None:
            a = max(p["start"], p["peak"] - SNIPPET_TOKENS // 3)
            b = min(p["end"], a + SNIPPET_TOKENS)
            text = " ".join(tokenizer.decode(list(document_ids[a:b]), skip_special_tokens=True).split())
            snippet = ("…" if a > p["start"] else "") + text + ("…" if b < p["end"] else "")
        out.append(
            {"chapter": chapter, "position": p["start"] - text_start, "tokens": p["end"] - p["start"],
             "focus": p["focus"], "share": p["share"], "snippet": snippet}
        )  # fmt: skip
    return out
