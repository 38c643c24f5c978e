"""The pre-fill's time left from its fitted cost model (chunk cost = a + b * prefix)."""

from __future__ import annotations

import math

import pytest

from duo_qserve.eta import PrefillClock


def test_time_left_follows_a_cost_that_grows_with_the_prefix():
    chunk, total, a, b = 512, 512 * 100, 0.5, 2e-5
    clock, now = PrefillClock(0, 0.0), 0.0
    assert clock.seconds_left(total) == math.inf
    for start in range(0, total // 10, chunk):  # 10% done
        now += a + b * start
        clock.done(start + chunk, now)
    actual = sum(a + b * start for start in range(total // 10, total, chunk))
    assert clock.seconds_left(total) == pytest.approx(actual, rel=0.02)
    constant_rate = (total - total // 10) * now / (total // 10)
    assert constant_rate < 0.6 * actual  # what a constant rate would have said


def test_a_resumed_prefill_counts_only_the_chunks_it_ran():
    clock = PrefillClock(1000, 10.0)
    clock.done(1500, 11.0)
    assert clock.seconds_left(2000) == pytest.approx(1.0)


def test_the_benchmark_replay_scores_the_clock_against_the_time_that_remained():
    """``bench.eta.replay`` on chunks whose cost grows with the prefix exactly as the model says: the clock is
    right to rounding, while a constant rate promises too little."""
    from duo_qserve.bench.eta import replay, worst

    a, b, chunk, total = 0.5, 0.001, 50, 2000  # at 10% done the clock has seen three chunks
    points, at = [], 0.0
    for done in range(chunk, total + 1, chunk):
        at += chunk * (a + b * (done - chunk / 2))  # its tokens at the cost of its mean prefix
        points.append((done, at))
    rows = replay(points, total)
    assert len(rows) == len(points) - 2 and rows[0]["fraction_done"] == 2 * chunk / total
    assert worst(rows, 0.1, "clock_s") < 1e-9
    assert worst(rows, 0.1, "constant_rate_s") > 0.2
