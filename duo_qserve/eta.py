"""Time left in a pre-fill, from a cost model of its chunks: a prior cost curve, scaled to the chunks as they run.

A chunk attends to everything before it, so a token's cost grows with its prefix ``x``; on a CPU it grows faster
than linearly (the longer prefix falls out of the caches). The prior is a per-token cost ``a + b*x + c*x**2``
(seconds): from ``Engine.chunk_seconds`` at warm-up (``PrefillClock.prior_from_probe``, its growing part raised
to what real pre-fills show), or the previous document's fit on the same engine (``PrefillClock.fit``). It gives
the curve's shape; the chunks seen give its scale: the cost is ``p*a + q*(b*x + c*x**2)``, the constant part and
the growing part each scaled, fitted to the chunks by least squares on relative errors, with ``q`` held near ``p``
(``p == q``: the prior's shape on a faster or slower machine). Early chunks, short of prefix, say little about
``q``, so the prior's shape leads until the prefix grows; a chunk slowed by other work on the machine weighs in as
a relative error, not a squared second. Without a prior (the GPU: a book pre-fills in seconds) the curve is the
least-squares line ``a + b*x`` of the chunks' per-token costs, ``b >= 0``. The time left is the curve's integral
over the tokens still to run.

The contract: feed ``done(tokens, at)`` after each chunk (``at``: a monotonic time; the clock starts at
``start_time`` with ``start_tokens`` done); ``seconds_left(total)`` is ``inf`` before the first chunk, then a finite
estimate >= 0; on chunk times that follow a curve of the prior's shape, at any speed, it is exact from the first
chunk on. What it cannot foresee is the machine changing speed mid-way (other work starting or stopping). The
promise is within 20% once ``SHOW_FROM`` of the document is done; before that the app shows no figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Curve = tuple[float, float, float]  # per-token seconds a + b*x + c*x**2 at prefix x (tokens)
Chunk = tuple[int, int, float]  # (prefix, tokens, seconds)


class PrefillClock:
    """The pre-fill's time left (see the module docstring). ``prior``: a ``Curve``, or None."""

    NOISE = 0.15  # the relative error of one chunk's time on a busy machine
    SHAPE = 0.25  # how far (relative) the prior's growing part may be off against its constant part
    REFIT = (
        8192  # prefix tokens done after which ``fit`` may be the chunks' own quadratic, not the prior scaled
    )
    AGREE = 0.3  # ... where it agrees with the prior scaled within this much at twice the prefix done
    SHOW_FROM = 0.1  # the fraction done before which the UI shows no figure: one or two chunks are no promise
    PROBE = (0, 4096, 8192)  # the prefixes the app's warm-up times (``Engine.chunk_seconds``) for its prior
    # How much dearer a real pre-fill's growing part is than the probe's, against its constant part: the chunks of
    # every recorded first document (benchmarks/results/eta-*-2026-12-06.json) fit q/p = 1.28 (SmolLM2) and 1.39
    # (the 0.5B) on CPU time, 1.16 to 1.68 on wall time (4.3 where other work doubled it mid-way). Taken at its
    # face, the probe made the first chunks look cheap against the later ones: the clock under-counted from them.
    PROBE_GROWTH = 1.25

    def __init__(self, start_tokens: int, start_time: float, prior: Curve | None = None):
        self._tokens, self._time, self.prior = start_tokens, start_time, prior
        self._chunks: list[Chunk] = []

    @classmethod
    def prior_from_probe(cls, prefixes: Sequence[int], seconds: Sequence[float], chunk: int) -> Curve:
        """The curve through ``Engine.chunk_seconds(prefixes)`` (chunks of ``chunk`` tokens), on relative errors,
        every coefficient >= 0, its growing part then ``PROBE_GROWTH`` times dearer (what real pre-fills show)."""
        a, b, c = _fit_curve([(p, chunk, s) for p, s in zip(prefixes, seconds, strict=True) if s > 0])
        return a, cls.PROBE_GROWTH * b, cls.PROBE_GROWTH * c

    def done(self, tokens: int, at: float) -> None:
        if tokens > self._tokens:
            self._chunks.append((self._tokens, tokens - self._tokens, max(at - self._time, 1e-9)))
            self._tokens, self._time = tokens, at

    def scale(self) -> tuple[float, float]:
        """(p, q): the fitted scales of the prior's constant and growing parts (1, 1 before any chunk)."""
        if not self._chunks or self.prior is None:
            return 1.0, 1.0
        rows = [
            ([f / s / self.NOISE for f in _parts(self.prior, p, n)], 1 / self.NOISE)
            for p, n, s in self._chunks
        ]
        p, q = _solve([*rows, ([1 / self.SHAPE, -1 / self.SHAPE], 0.0)])  # the last row holds q near p
        return max(p, 0.0), max(q, 0.0)

    def fit(self) -> Curve | None:
        """The curve these chunks say, the next document's prior: with no prior, their line; with a prior, the prior
        scaled, or their own quadratic once they span ``REFIT`` tokens of prefix (enough to see the bend) if it
        agrees with the prior scaled within ``AGREE`` at twice that prefix. A machine whose load changed during
        the document bends its curve (on a shared CPU a chunk's time can double mid-way); that bend must not
        pass on to the next document."""
        if not self._chunks:
            return self.prior
        if self.prior is None:
            return _line(self._chunks)
        (p, q), (a, b, c) = self.scale(), self.prior
        scaled = p * a, q * b, q * c
        if self._tokens - self._chunks[0][0] < self.REFIT or len(self._chunks) < 8:
            return scaled
        own, far = _fit_curve(self._chunks), 2 * self._tokens  # where the next document's chunks may go
        agree = abs(sum(_parts(own, far, 1)) / sum(_parts(scaled, far, 1)) - 1) <= self.AGREE
        return own if agree else scaled

    def seconds_left(self, total: int) -> float:
        if not self._chunks:
            return math.inf
        curve, (p, q) = (
            (_line(self._chunks), (1.0, 1.0)) if self.prior is None else (self.prior, self.scale())
        )
        fixed, grows = _parts(curve, self._tokens, max(total, self._tokens) - self._tokens)
        return max(p * fixed + q * grows, 0.0)


def _parts(curve: Curve, prefix: float, n: float) -> tuple[float, float]:
    """(constant part, growing part) of the seconds of ``n`` tokens after ``prefix`` on ``curve``."""
    a, b, c = curve
    x0, x1 = prefix, prefix + n
    return a * n, b * (x1**2 - x0**2) / 2 + c * (x1**3 - x0**3) / 3


def _solve(rows: list[tuple[list[float], float]]) -> list[float]:
    """Least squares of ``sum((f . theta - y)**2)`` over rows (f, y), by the normal equations (2x2 or 3x3)."""
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


def _line(chunks: Sequence[Chunk]) -> Curve:
    """Per-token ``a + b*x``: the least-squares line of the chunks' per-token costs at their mean prefixes,
    ``b >= 0`` (noise cannot make later chunks cheaper); one chunk, or all at one prefix: ``b = 0``."""
    xs = [p + n / 2 for p, n, _ in chunks]
    ys = [s / n for _, n, s in chunks]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    b = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread, 0.0) if spread else 0.0
    return my - b * mx, b, 0.0


def _fit_curve(chunks: Sequence[Chunk]) -> Curve:
    """Per-token ``a + b*x + c*x**2`` through the chunks, least squares on relative errors, with no more terms
    than chunks and every coefficient >= 0 (negative ones are dropped and the rest refitted; with none left, the
    mean cost per token)."""
    unit = 1024.0  # x in thousands of tokens inside the fit, so the normal equations stay well conditioned
    terms, coef = [0, 1, 2][: len(chunks)], [0.0, 0.0, 0.0]
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
