"""Time left in a pre-fill, from a cost model of its chunks: a prior curve, scaled to the chunks as they run.

A chunk attends to everything before it, so a token's cost grows with its prefix ``x``; on a CPU it grows faster
than linearly (the longer prefix falls out of the caches). The prior is a per-token cost ``a + b*x + c*x**2``
(seconds): from ``Engine.chunk_seconds`` at warm-up (``PrefillClock.prior_from_probe``), or from the previous
document's fit on the same engine (``PrefillClock.fit``). It gives the curve's shape; the chunks seen give its
scale. The cost is ``p*a + q*(b*x + c*x**2)``: the constant part and the part that grows, each scaled, fitted to the
chunks by least squares on relative errors, with ``q`` held near ``p`` by the prior (``p == q`` is the prior's
shape on a faster or slower machine). Early chunks, short of prefix, say little about ``q``, so the prior leads
until the prefix grows; a chunk far from the model (a pause, other work on the machine) weighs in as a mild
relative error, not a squared second. Without a prior the curve is a straight line, ``a + b*x``, fitted the same
way with ``b >= 0``. The time left is the model's integral over the tokens still to run.

The contract: ``done(tokens, at)`` after each chunk (``at``: a monotonic time, the first call after the clock's
start); ``seconds_left(total)`` is ``inf`` before the first chunk, else a finite estimate >= 0. On chunk times that
follow a curve of the prior's shape, at any speed, it is exact from the first chunk on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Curve = tuple[float, float, float]  # per-token seconds a + b*x + c*x**2 at prefix x (tokens)


def _integral(curve: Curve, x0: float, x1: float) -> tuple[float, float]:
    """(constant part, growing part) of the curve's cost for the tokens at prefixes x0..x1."""
    a, b, c = curve
    return a * (x1 - x0), b * (x1**2 - x0**2) / 2 + c * (x1**3 - x0**3) / 3


def _solve(rows: list[tuple[list[float], float]]) -> list[float]:
    """Least squares of ``sum((f . theta - y)**2)`` over rows (f, y): the normal equations by Gaussian
    elimination (the systems here are 2x2 or 3x3)."""
    n = len(rows[0][0])
    m = [
        [sum(f[i] * f[j] for f, _ in rows) for j in range(n)] + [sum(f[i] * y for f, y in rows)]
        for i in range(n)
    ]
    for i in range(n):
        pivot = max(range(i, n), key=lambda r: abs(m[r][i]))
        m[i], m[pivot] = m[pivot], m[i]
        if abs(m[i][i]) < 1e-300:
            return [0.0] * n
        for r in range(n):
            if r != i:
                k = m[r][i] / m[i][i]
                m[r] = [x - k * y for x, y in zip(m[r], m[i], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


class PrefillClock:
    """The pre-fill's time left (see the module docstring). ``prior``: a ``Curve``, or None."""

    NOISE = 0.15  # the relative error of one chunk's time on a busy machine
    SHAPE = 0.5  # how far (relative) the prior's growing part may be off against its constant part
    PROBE = (0, 4096, 8192)  # prefixes that ``Engine.chunk_seconds`` times for ``prior_from_probe``

    def __init__(self, start_tokens: int, start_time: float, prior: Curve | None = None):
        self._tokens, self._time, self.prior = start_tokens, start_time, prior
        self._chunks: list[tuple[int, int, float]] = []  # (prefix, tokens, seconds)

    @staticmethod
    def prior_from_probe(prefixes: Sequence[int], seconds: Sequence[float], chunk: int) -> Curve:
        """The per-token curve through ``Engine.chunk_seconds(prefixes)`` (chunks of ``chunk`` tokens): least
        squares on relative errors, with ``b, c >= 0``."""
        return _fit_curve([(p, chunk, s) for p, s in zip(prefixes, seconds, strict=True) if s > 0])

    def done(self, tokens: int, at: float) -> None:
        if tokens > self._tokens:
            self._chunks.append((self._tokens, tokens - self._tokens, max(at - self._time, 1e-9)))
            self._tokens, self._time = tokens, at

    def scale(self) -> tuple[float, float]:
        """(p, q): the fitted scales of the prior's constant and growing parts (1, 1 before any chunk)."""
        if not self._chunks or self.prior is None:
            return 1.0, 1.0
        rows = []
        for p, n, s in self._chunks:
            fixed, grows = _integral(self.prior, p, p + n)
            rows.append(([fixed / s / self.NOISE, grows / s / self.NOISE], 1 / self.NOISE))
        rows.append(([1 / self.SHAPE, -1 / self.SHAPE], 0.0))  # q near p
        p, q = _solve(rows)
        return max(p, 0.0), max(q, 0.0)

    def fit(self) -> Curve | None:
        """The per-token curve these chunks say: the prior scaled, or with no prior (or chunks across 8K tokens
        of prefix or more, enough to see the curve's bend) its own fit; the next document's prior."""
        if not self._chunks:
            return self.prior
        span = self._chunks[-1][0] - self._chunks[0][0]
        if self.prior is None or (len(self._chunks) >= 8 and span >= 8192):
            return _fit_curve(self._chunks, quadratic=self.prior is not None)
        (p, q), (a, b, c) = self.scale(), self.prior
        return p * a, q * b, q * c

    def seconds_left(self, total: int) -> float:
        if not self._chunks:
            return math.inf
        if self.prior is None:
            curve, (p, q) = _fit_curve(self._chunks, quadratic=False), (1.0, 1.0)
        else:
            curve, (p, q) = self.prior, self.scale()
        fixed, grows = _integral(curve, self._tokens, max(total, self._tokens))
        return max(p * fixed + q * grows, 0.0)


def _fit_curve(chunks: Sequence[tuple[int, int, float]], quadratic: bool = True) -> Curve:
    """Per-token ``a + b*x (+ c*x**2)`` through chunks (prefix, tokens, seconds), least squares on relative
    errors, with no more terms than chunks and every coefficient >= 0 (negative ones are dropped and the rest
    refitted; with none left, the mean cost per token)."""
    unit = 1024.0  # x in thousands of tokens inside the fit, so the normal equations stay well conditioned
    terms = [0, 1, 2][: min(3 if quadratic else 2, len(chunks))]
    coef = [0.0, 0.0, 0.0]
    while terms:
        rows = []
        for p, n, s in chunks:
            x0, x1 = p / unit, (p + n) / unit
            parts = [x1 - x0, (x1**2 - x0**2) / 2, (x1**3 - x0**3) / 3]
            rows.append(([parts[t] * unit / s for t in terms], 1.0))
        theta = _solve(rows)
        if min(theta) >= 0 and max(theta) > 0:
            for t, v in zip(terms, theta, strict=True):
                coef[t] = v / unit**t
            return coef[0], coef[1], coef[2]
        terms = [t for t, v in zip(terms, theta, strict=True) if v > 0][: len(terms) - 1]
    return sum(s for _, _, s in chunks) / sum(n for _, n, _ in chunks), 0.0, 0.0
