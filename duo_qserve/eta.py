"""Time left in a pre-fill, from a cost model fitted as its chunks run.

A chunk attends to everything before it, so its cost grows with the prefix: ``seconds = a + b * prefix``. Each
finished chunk is one observation; ``a`` and ``b`` are their least-squares fit, and the time left is the model's
sum over the chunks still to run. A constant rate (tokens so far / seconds so far) would promise too little, since
every later chunk is dearer than the ones behind it.
"""

from __future__ import annotations

import math


class PrefillClock:
    """Feed ``done(tokens, at)`` after each chunk (``at``: a monotonic time); ``seconds_left(total)`` estimates the
    rest. With one chunk seen it assumes a constant cost; with none it returns ``inf``."""

    def __init__(self, start_tokens: int, start_time: float):
        self._tokens, self._time = start_tokens, start_time
        self._chunks: list[tuple[int, int, float]] = []  # (prefix, tokens, seconds)

    def done(self, tokens: int, at: float) -> None:
        if tokens > self._tokens:
            self._chunks.append((self._tokens, tokens - self._tokens, at - self._time))
            self._tokens, self._time = tokens, at

    def fit(self) -> tuple[float, float]:
        """(a, b) of ``seconds per token = a + b * prefix``, per token so that uneven chunks (the last one) fit."""
        xs = [p + n / 2 for p, n, _ in self._chunks]  # a chunk's mean prefix
        ys = [s / n for _, n, s in self._chunks]
        if len(xs) < 2 or max(xs) == min(xs):
            return (sum(ys) / len(ys), 0.0) if ys else (math.nan, 0.0)
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        b = max(b, 0.0)  # noise cannot make later chunks cheaper
        return my - b * mx, b

    def seconds_left(self, total: int) -> float:
        if not self._chunks:
            return math.inf
        a, b = self.fit()
        left = total - self._tokens
        mean_prefix = self._tokens + left / 2
        return max(left * (a + b * mean_prefix), 0.0)
