"""Choosing an answer's tokens: validated sampling parameters, the guards against loops, and how an answer ends.

Greedy decoding of a small model often falls into a loop (one sentence again and again up to the token limit). Two
guards work on the answer's own tokens, never on the document's (an answer must be free to copy a needle, however
often the book repeats it):

- ``repetition_penalty`` makes every token already in the answer less likely (a positive logit is divided by it,
  a negative one multiplied), and ``no_repeat_ngram`` forbids the token that would repeat an n-gram of the answer;
- ``repeat_stop`` ends the answer once its last ``repeat_stop`` tokens already appeared in it, in that order: by
  then the answer is repeating itself and would only go on doing so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ENDED_BY = ("eos", "max_tokens", "repetition", "stop", "cancel")  # GenerationStats.ended_by's values


@dataclass(frozen=True)
class Sampling:
    """How ``Engine.ask`` picks tokens; checked on construction (ValueError saying what is allowed).

    The defaults are the chat defaults: greedy with a mild penalty on the answer's own tokens and a stop once it
    repeats 24 tokens. ``Sampling.greedy()`` is plain greedy decoding (no guards), the reference the defaults are
    measured against.
    """

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # 1: no nucleus cut
    repetition_penalty: float = 1.1  # 1: off
    no_repeat_ngram: int = 0  # 0: off; n >= 2 forbids repeating any n tokens of the answer
    repeat_stop: int = 24  # 0: off; else stop when the last this-many tokens already appeared in the answer
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}"
            )
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1] (1: no nucleus cut), got {self.top_p!r}")
        if (
            not _is_real(self.repetition_penalty)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty < 1
        ):
            raise ValueError(
                f"repetition_penalty must be a finite number >= 1 (1: off), got {self.repetition_penalty!r}"
            )
        if not _is_count(self.no_repeat_ngram) or self.no_repeat_ngram == 1:
            raise ValueError(
                f"no_repeat_ngram must be 0 (off) or an integer >= 2, got {self.no_repeat_ngram!r}"
            )
        if not _is_count(self.repeat_stop):
            raise ValueError(f"repeat_stop must be 0 (off) or a positive integer, got {self.repeat_stop!r}")
        if self.seed is not None and not _is_count(self.seed):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")

    @classmethod
    def greedy(cls) -> Sampling:
        return cls(repetition_penalty=1.0, no_repeat_ngram=0, repeat_stop=0)


def check_max_new_tokens(max_new_tokens: int) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class AnswerGuard:
    """The answer's tokens so far, for the penalty, the n-gram ban and the repeat stop (see the module docstring).

    The penalty reads a mask of the answer's tokens kept on the logits' device, so a step costs no host transfer;
    the n-gram ban and the repeat check are dictionary look-ups of the last few tokens.
    """

    def __init__(self, sampling: Sampling, vocab_size: int, device: torch.device):
        self.sampling = sampling
        self.ids: list[int] = []
        self._seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        self._next: dict[tuple[int, ...], set[int]] = {}  # (n-1)-gram -> tokens that followed it
        self._windows: set[tuple[int, ...]] = set()  # every repeat_stop-long span of the answer

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [vocab] with the penalty and the n-gram ban applied (a new tensor; the input is kept)."""
        s = self.sampling
        logits = logits.float()
        if s.repetition_penalty != 1 and self.ids:
            penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
            logits = torch.where(self._seen, penalised, logits)
        n = s.no_repeat_ngram
        if n and len(self.ids) >= n - 1:
            banned = self._next.get(tuple(self.ids[len(self.ids) - n + 1 :]))
            if banned:
                logits = logits.clone()
                logits[list(banned)] = -math.inf
        return logits

    def add(self, token: int) -> bool:
        """Record ``token``; True when the answer now repeats itself (its last ``repeat_stop`` tokens occurred
        before)."""
        s, ids = self.sampling, self.ids
        ids.append(token)
        self._seen[token] = True
        n = s.no_repeat_ngram
        if n and len(ids) >= n:
            self._next.setdefault(tuple(ids[-n:-1]), set()).add(token)
        w = s.repeat_stop
        if w and len(ids) >= w:
            window = tuple(ids[-w:])
            if window in self._windows:
                return True
            self._windows.add(window)
        return False


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling over the smallest set with mass >= top_p."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
