"""The pre-fill's time left (``duo_qserve.eta``): a prior cost curve scaled to the chunks as they run."""

from __future__ import annotations

import math
import random

import pytest

from duo_qserve.eta import PrefillClock

CHUNK = 512
CPU = (2.0e-3, 1.0e-7, 1.0e-11)  # per-token seconds a + b*x + c*x**2: convex, as pre-fill on a CPU


def chunk_seconds(curve, prefix, n=CHUNK):
    a, b, c = curve
    x0, x1 = prefix, prefix + n
    return a * (x1 - x0) + b * (x1**2 - x0**2) / 2 + c * (x1**3 - x0**3) / 3


def run(curve, total, prior=None, noise=0.0, seed=0):
    """Replay a pre-fill whose chunks cost ``curve`` (times a log-normal noise): [(fraction done, clock's
    seconds left, true seconds left)] after each chunk but the last."""
    rng = random.Random(seed)
    times = [chunk_seconds(curve, p) * math.exp(rng.gauss(0, noise)) for p in range(0, total, CHUNK)]
    clock, at, rows = PrefillClock(0, 100.0, prior=prior), 100.0, []
    for i, s in enumerate(times[:-1]):
        at += s
        clock.done((i + 1) * CHUNK, at)
        rows.append(((i + 1) * CHUNK / total, clock.seconds_left(total), sum(times[i + 1 :])))
    return rows


def worst(rows, after):
    return max(abs(est - true) / true for f, est, true in rows if f >= after)


def test_before_any_chunk_the_time_left_is_unknown():
    assert PrefillClock(0, 0.0).seconds_left(1000) == math.inf
    assert PrefillClock(0, 0.0, prior=CPU).seconds_left(1000) == math.inf


def test_a_prior_of_the_right_shape_is_exact_from_the_first_chunk_at_any_speed():
    slower = tuple(2.7 * v for v in CPU)  # a busier machine: every part of the cost 2.7 times dearer
    rows = run(slower, 16384, prior=CPU)
    assert worst(rows, 0.0) < 1e-9


def test_the_prior_leads_early_and_the_chunks_correct_its_shape_as_the_prefix_grows():
    """The prior's growing part is 40% too cheap. Early chunks, short of prefix, cannot tell, so the error at
    10% done is at most that 40% of the growing part's share of the time left (the bound); as the prefix grows
    the fit moves q off p: the error falls at every chunk, to under half the bound from 80% done on."""
    total = 16384
    prior = (CPU[0], 0.6 * CPU[1], 0.6 * CPU[2])
    rows = run(CPU, total, prior=prior)
    ten = int(0.1 * total) // CHUNK * CHUNK + CHUNK  # the first progress point at or past 10%
    fixed = CPU[0] * (total - ten)
    share = 1 - fixed / chunk_seconds(CPU, ten, total - ten)
    bound = 0.4 * share
    assert 0.15 < bound < 0.4  # a test that means something: the growing part dominates what is left
    assert worst(rows, 0.1) <= bound + 1e-9
    errors = [abs(est - true) / true for _, est, true in rows]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:], strict=False))
    assert worst(rows, 0.8) < bound / 2
    constant_rate_like = run(CPU, total, prior=(CPU[0] + CPU[1] * 300, 0.0, 0.0))  # a flat prior
    assert worst(constant_rate_like, 0.1) > worst(rows, 0.1)


def test_noisy_chunks_on_a_prior_of_the_right_shape_stay_within_the_noise():
    """Chunk times with 15% log-normal noise, the prior's shape right, its speed off by 2x. After k chunks the
    fitted scale is off by about 15% / sqrt(k); the time that really remains carries the noise of the chunks still
    to run, 15% / sqrt(n) with n their effective count (the dearer ones weigh more). So at each progress point
    sigma = 15% * sqrt(1/k + 1/n); the fit of two scales (p, q) widens it a little (over 200 seeds the median
    error is 0.94 sigma, the 99.9th percentile 4.1 sigma). Over 20 seeds, the median must stay under 1.2 sigma and
    every point under 4.5 sigma; a clock that ignored the chunks (the prior as it is) would be off by 50%."""
    total, noise = 16384, 0.15
    costs = [chunk_seconds(CPU, p) for p in range(0, total, CHUNK)]
    prior = tuple(v / 2 for v in CPU)
    z = []
    for seed in range(20):
        for f, est, true in run(CPU, total, prior=prior, noise=noise, seed=seed):
            k = round(f * total / CHUNK)
            n = sum(costs[k:]) ** 2 / sum(c * c for c in costs[k:])
            if f >= 0.1:
                z.append(abs(est - true) / true / (noise * math.sqrt(1 / k + 1 / n)))
    z.sort()
    assert z[len(z) // 2] < 1.2 and z[-1] < 4.5


def test_without_a_prior_the_clock_fits_a_straight_line():
    a, b = 1e-3, 2e-7
    rows = run((a, b, 0.0), 8192)
    assert worst(rows, 0.1) < 1e-6  # two chunks fix a line, and the line is the truth
    assert worst(run(CPU, 16384), 0.1) > 0.2  # but a line cannot see the bend


def test_a_resumed_prefill_counts_only_the_chunks_it_ran():
    clock = PrefillClock(1000, 10.0)
    clock.done(1500, 11.0)
    assert clock.seconds_left(2000) == pytest.approx(1.0)


def test_the_probe_prior_is_the_probes_curve_with_its_growing_part_raised():
    prefixes = PrefillClock.PROBE
    seconds = [chunk_seconds(CPU, p) for p in prefixes]
    prior = PrefillClock.prior_from_probe(prefixes, seconds, CHUNK)
    g = PrefillClock.PROBE_GROWTH
    assert prior == pytest.approx((CPU[0], g * CPU[1], g * CPU[2]), rel=1e-6)


def test_a_prefill_whose_growth_the_probe_under_timed_is_exact_from_the_first_chunk():
    """Real pre-fills grow faster with the prefix than the warm-up's probe times (``PROBE_GROWTH``, measured): on
    such chunks the clock from the probe's prior is exact at once, where the probe's curve taken at its face
    under-counts the time left from the first chunk on."""
    g = PrefillClock.PROBE_GROWTH
    real = (CPU[0], g * CPU[1], g * CPU[2])
    seconds = [chunk_seconds(CPU, p) for p in PrefillClock.PROBE]
    rows = run(real, 8192, prior=PrefillClock.prior_from_probe(PrefillClock.PROBE, seconds, CHUNK))
    assert worst(rows, 0.0) < 1e-6
    at_face = run(real, 8192, prior=CPU)
    assert at_face[0][1] < 0.95 * at_face[0][2]  # what the clock did before: short by over 5% at the start


def test_the_fit_of_a_whole_document_is_the_next_documents_prior():
    """After a whole pre-fill (8K tokens of prefix and more) the clock's fit is the chunks' own curve when it
    agrees with the prior's shape scaled (within 30% at twice the prefix done), so the next document is exact
    from its first chunk."""
    prior = (CPU[0], 0.8 * CPU[1], 0.8 * CPU[2])  # the growing part 20% too cheap
    clock, at = PrefillClock(0, 0.0, prior=prior), 0.0
    for p in range(0, 16384, CHUNK):
        at += chunk_seconds(CPU, p)
        clock.done(p + CHUNK, at)
    fit = clock.fit()
    for p in (0, 8192, 24576):
        assert chunk_seconds(fit, p) == pytest.approx(chunk_seconds(CPU, p), rel=1e-6)
    assert worst(run(CPU, 32768, prior=fit), 0.0) < 1e-6


def test_a_document_slowed_mid_way_passes_on_the_prior_scaled_not_its_bent_curve():
    """Other work starts half-way and every later chunk takes twice as long: the chunks' own quadratic bends up
    (it would promise a 32K document far too late); the next prior is the prior's shape scaled to them."""
    clock, at = PrefillClock(0, 0.0, prior=CPU), 0.0
    for p in range(0, 16384, CHUNK):
        at += chunk_seconds(CPU, p) * (2 if p >= 8192 else 1)
        clock.done(p + CHUNK, at)
    fit = clock.fit()
    p, q = clock.scale()
    assert fit == pytest.approx((p * CPU[0], q * CPU[1], q * CPU[2]))
    assert q > 1 and q > p  # the slow chunks were the later ones, where the growing part weighs most
    from duo_qserve.eta import _fit_curve

    bent = _fit_curve(clock._chunks)
    assert chunk_seconds(bent, 32768) > 1.3 * chunk_seconds(fit, 32768)


def test_the_benchmark_replay_scores_each_clock_against_the_time_that_remained():
    """``bench.eta.replay`` on chunks of a known convex cost: the app's clock with the right prior is exact, the
    straight line and the constant rate are not."""
    from duo_qserve.bench.eta import ConstantRate, replay, worst

    total, points, at = 8192, [(0, 0.0)], 0.0
    for p in range(0, total, CHUNK):
        at += chunk_seconds(CPU, p)
        points.append((p + CHUNK, at))
    clocks = {"clock_s": lambda n, t: PrefillClock(n, t, prior=CPU), "linear_s": PrefillClock,
              "constant_rate_s": ConstantRate}  # fmt: skip
    rows = replay(points, total, clocks)
    assert len(rows) == len(points) - 2 and rows[0]["fraction_done"] == CHUNK / total
    assert worst(rows, 0.1, "clock_s") < 1e-9
    assert worst(rows, 0.1, "linear_s") > 0.05
    assert worst(rows, 0.1, "constant_rate_s") > 0.2
