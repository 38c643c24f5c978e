"""How right the pre-fill's "time left" is: pre-fill real documents one after another on one engine, as the app
does, and at every chunk compare what a clock would have shown with the time that actually remained.

The run starts as the app starts: the engine's warm-up, then the app's probe (``Engine.chunk_seconds`` at
``PrefillClock.PROBE``: the first document's prior), and a denser probe beside it (the alternatives' priors).
Each document's progress points are recorded (tokens done, wall time, the process's CPU time, the load average),
and every clock is replayed on them, fed exactly as the app feeds it: the app's ``PrefillClock`` (the warm-up
prior on the first document, the previous document's fit on the later ones), the same clock with other priors, an
online quadratic and power law with no prior, the straight line the prior replaced, and a constant rate. Reports,
per document and clock, the largest relative error once 10%, 20% and 30% of the document are done (the promise:
within 20% from 10% on) and the median from 10%, on wall time (what the app shows) and on CPU time (run it with
one thread: the work alone, the other load of a shared machine taken out).

    OMP_NUM_THREADS=1 python -m duo_qserve.bench.eta --model default --cpu --essays DIR --docs essays:8192 pydocs:16384
    python -m duo_qserve.bench.eta --replay RESULT.json [--replay-to NEW.json]  # re-score recorded points
    python -m duo_qserve.bench.eta --sweep RESULT.json ...       # the app's clock with its knobs turned
    python -m duo_qserve.bench.eta --model default --cpu --probe-only 3   # the warm-up and the probe's cost
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from duo_qserve import data, environment
from duo_qserve.bench.common import write_result
from duo_qserve.bench.engine_speed import document_ids
from duo_qserve.engine import Engine, EngineSettings
from duo_qserve.eta import Curve, PrefillClock, _fit_curve, _parts, _solve
from duo_qserve.options import add_engine_args, settings_from_args

AFTER = (0.1, 0.2, 0.3)
PROBE = (0, 1024, 2048, 4096, 8192, 12288, 16384)  # prefixes the bench probes (the app: PrefillClock.PROBE)


class CurveClock(PrefillClock):
    """An online fit with no prior (an alternative, scored beside the app's clock): per-token ``a + b*x + c*x**2``
    (``quadratic``: every coefficient >= 0, no more terms than chunks), or ``a + b*x**k`` (``power``: ``k`` in 1..3,
    chosen by relative squared error plus ``(k - 1)**2 / 400`` per chunk, so that a bend needs chunks to show)."""

    def __init__(self, start_tokens: int, start_time: float, kind: str = "quadratic"):
        super().__init__(start_tokens, start_time)
        self.kind = kind

    def seconds_left(self, total: int) -> float:
        if not self._chunks:
            return math.inf
        end, u = max(total, self._tokens), 1024.0
        if self.kind == "quadratic":
            return sum(_parts(_fit_curve(self._chunks), self._tokens, end - self._tokens))
        best = None
        for k in [1 + i / 8 for i in range(17)]:
            rows = [([n / s, (((p + n) / u) ** (k + 1) - (p / u) ** (k + 1)) / (k + 1) / s], 1.0)
                    for p, n, s in self._chunks]  # fmt: skip
            a, b = _solve(rows) if len(rows) >= 2 else (1 / rows[0][0][0], 0.0)
            a, b = max(a, 0.0), max(b, 0.0)
            err = sum((f[0] * a + f[1] * b - 1) ** 2 for f, _ in rows) + (k - 1) ** 2 / 400 * len(rows)
            if best is None or err < best[0]:
                best = (err, a, b, k)
        _, a, b, k = best
        return a * (end - self._tokens) + b * ((end / u) ** (k + 1) - (self._tokens / u) ** (k + 1)) / (k + 1)


class ConstantRate:
    """Tokens so far over seconds so far."""

    def __init__(self, start_tokens: int, start_time: float):
        self._start, self._t0, self._tokens, self._time = start_tokens, start_time, start_tokens, start_time

    def done(self, tokens: int, at: float) -> None:
        self._tokens, self._time = tokens, at

    def seconds_left(self, total: int) -> float:
        if self._tokens == self._start:
            return math.inf
        return (self._time - self._t0) / (self._tokens - self._start) * (total - self._tokens)


class VariantClock(PrefillClock):
    """The app's clock with its knobs turned, for ``--sweep``: ``shape`` (``SHAPE``), ``refit`` (prefix tokens
    after which ``fit`` refits its own quadratic; None: never, the prior scaled), ``huber`` (reweighting passes
    that count a chunk off by more than 1.5 noise as off by that much), ``forget`` (each older chunk weighs this
    much less)."""

    def __init__(self, start_tokens, start_time, prior=None, shape=0.25, refit=8192, huber=0, forget=1.0):
        super().__init__(start_tokens, start_time, prior)
        self.SHAPE, self.refit, self.huber, self.forget = shape, refit, huber, forget

    def scale(self) -> tuple[float, float]:
        if not self._chunks or self.prior is None:
            return 1.0, 1.0
        parts = [[f / s for f in _parts(self.prior, p, n)] for p, n, s in self._chunks]
        ages = range(len(parts) - 1, -1, -1)
        weights = [self.forget ** (age / 2) / self.NOISE for age in ages]
        for _ in range(self.huber + 1):
            rows = [([w * f for f in fs], w) for fs, w in zip(parts, weights, strict=True)]
            p, q = _solve([*rows, ([1 / self.SHAPE, -1 / self.SHAPE], 0.0)])
            weights = [self.forget ** (age / 2) * min(1, 1.5 * self.NOISE / max(abs(p * f + q * g - 1), 1e-12))
                       / self.NOISE for age, (f, g) in zip(ages, parts, strict=True)]  # fmt: skip
        return max(p, 0.0), max(q, 0.0)

    def fit(self) -> Curve | None:
        if self.prior is not None and self._chunks and (self.refit is None or self._tokens < self.refit):
            (p, q), (a, b, c) = self.scale(), self.prior
            return p * a, q * b, q * c
        return super().fit()


SWEEP = [dict(), dict(shape=0.5), dict(shape=1.0), dict(refit=None), dict(shape=0.5, refit=None),
         dict(huber=3), dict(forget=0.8), dict(huber=3, forget=0.8)]  # fmt: skip


def sweep(paths: list[str]) -> dict:
    """Every ``SWEEP`` variant of the app's clock replayed on recorded documents, in each file's order (the
    previous document's fit as the prior, as the app): worst error from 10/20/30% done and the median from 10%."""
    out = []
    for knobs in SWEEP:
        docs = []
        for path in paths:
            result = json.loads(Path(path).read_text())
            probe, chunk = result["probe"], result["chunk_size"]
            warm = (PrefillClock.prior_from_probe(probe["app"]["prefixes"], probe["app"]["chunk_s"], chunk)
                    if "app" in probe else probe_prior(probe, chunk))  # fmt: skip
            for clock_time, column in (("wall", 1), ("cpu", 2)):
                previous = None
                for doc in result["documents"]:
                    if clock_time == "cpu" and len(doc["points"][0]) < 4:
                        continue
                    points = [(pt[0], pt[column]) for pt in doc["points"]]
                    prior = warm if previous is None else previous
                    rows = replay(
                        points,
                        doc["tokens"],
                        {"c": lambda n, t, c=prior, k=knobs: VariantClock(n, t, c, **k)},
                    )
                    docs.append(dict(model=result["model"], kind=doc["kind"], tokens=doc["tokens"], time=clock_time,
                                     worst=[round(worst(rows, a, "c"), 4) for a in AFTER],
                                     median_from_10=round(median_error(rows, 0.1, "c"), 4)))  # fmt: skip
                    final = VariantClock(*points[0], prior, **knobs)
                    for d, t in points[1:]:
                        final.done(d, t)
                    previous = final.fit()
        out.append(dict(knobs=knobs, documents=docs))
    return dict(files=paths, variants=out)


def replay(points: list[tuple[int, float]], total: int, clocks: dict) -> list[dict]:
    """One row per progress point (tokens done, time) between the first and the last: each clock's estimate
    (``clocks``: name -> a function of (start tokens, start time) that makes one) and the time that really
    remained until the last point."""
    (start_tokens, start), end = points[0], points[-1][1]
    made = {name: make(start_tokens, start) for name, make in clocks.items()}
    rows = []
    for done, at in points[1:-1]:
        row = dict(fraction_done=done / total, actual_s=end - at)
        for name, clock in made.items():
            clock.done(done, at)
            row[name] = clock.seconds_left(total)
        rows.append(row)
    return rows


def worst(rows: list[dict], after: float, key: str) -> float:
    return max(
        (abs(r[key] - r["actual_s"]) / r["actual_s"] for r in rows if r["fraction_done"] >= after), default=0
    )


def median_error(rows: list[dict], after: float, key: str) -> float:
    errors = sorted(abs(r[key] - r["actual_s"]) / r["actual_s"] for r in rows if r["fraction_done"] >= after)
    return errors[len(errors) // 2] if errors else 0.0


def doc_text(kind: str, essays: str | None) -> str:
    if kind == "essays":
        if not essays:
            sys.exit("--essays DIR is needed for essays documents")
        return "\n\n".join(f.read_text(errors="replace") for f in sorted(Path(essays).glob("*.txt")))
    if kind == "pydocs":
        return data.pydocs_text()
    raise SystemExit(f"unknown document kind {kind!r}: essays or pydocs")


def record(engine: Engine, ids: list[int]) -> dict:
    """Pre-fill ``ids`` and keep every progress report: (tokens done, wall seconds since the start, the process's
    CPU seconds since the start, the 1-minute load average), from zeros when the pre-fill is called, as the app's
    clock starts. With one thread the CPU seconds are the work alone, whatever else the machine runs."""
    now = lambda: (time.perf_counter(), time.process_time(), os.getloadavg()[0])  # noqa: E731
    points = [(0, *now())]
    info = engine.ingest(ids, on_progress=lambda done, total: points.append((done, *now())))
    (_, wall0, cpu0, _) = points[0]
    rows = [(done, wall - wall0, cpu - cpu0, load) for done, wall, cpu, load in points]
    return dict(tokens=len(ids), prefill_s=info.prefill_seconds, points=rows)


def clocks(prior: Curve | None, warm: Curve, probes: dict[str, Curve]) -> dict:
    """Every clock scored, by name: the app's (``prior``: the warm-up probe's curve on a first document, the
    previous document's fit on the later ones) and the alternatives (``probes``: other warm-up priors)."""
    return {
        "clock_s": lambda n, t: PrefillClock(n, t, prior=prior),
        "clock_warm_prior_s": lambda n, t: PrefillClock(n, t, prior=warm),
        **{f"clock_{name}_s": (lambda n, t, c=c: PrefillClock(n, t, prior=c)) for name, c in probes.items()},
        "quadratic_s": lambda n, t: CurveClock(n, t, "quadratic"),
        "power_s": lambda n, t: CurveClock(n, t, "power"),
        "linear_s": PrefillClock,  # no prior: the straight line, the clock before the prior
        "constant_rate_s": ConstantRate,
    }


def probe_prior(probe: dict, chunk: int, prefixes=PrefillClock.PROBE, key: str = "chunk_s") -> Curve:
    """A warm-up prior from the bench's probe (``key``: its cold-cache or warm-cache times) at ``prefixes``."""
    times = dict(zip(probe["prefixes"], probe[key], strict=True))
    return PrefillClock.prior_from_probe(prefixes, [times[p] for p in prefixes], chunk)


def score(result: dict) -> dict:
    """Replay every clock on each recorded document, in order, on wall time (what the app shows) and on CPU
    time (the work alone: the machine's other load taken out): the app's clock has the warm-up prior (the app's
    own probe) on the first document and the previous document's fit on the later ones."""
    probe, chunk = result["probe"], result["chunk_size"]
    if "app" in probe:
        warm = PrefillClock.prior_from_probe(probe["app"]["prefixes"], probe["app"]["chunk_s"], chunk)
    else:  # recorded before the bench ran the app's probe apart: its own probe at the app's prefixes
        warm = probe_prior(probe, chunk)
    probes = {"probe_all_prefixes": probe_prior(probe, chunk, probe["prefixes"])}
    if "warm_cache_chunk_s" in probe:
        probes["probe_warm_cache"] = probe_prior(probe, chunk, key="warm_cache_chunk_s")
    result["warm_prior"], result["scored_by"] = warm, environment.commit()
    for clock_time, column in (("wall", 1), ("cpu", 2)):
        previous = None
        for doc in result["documents"]:
            if len(doc["points"][0]) <= column + 1 and clock_time == "cpu":
                continue  # recorded before CPU time was
            points = [(pt[0], pt[column]) for pt in doc["points"]]
            prior = warm if previous is None else previous
            rows = replay(points, doc["tokens"], clocks(prior, warm, probes))
            names = [k for k in rows[0] if k.endswith("_s") and k != "actual_s"]
            doc[clock_time] = dict(
                prior=dict(source="warm-up probe" if previous is None else "previous document", curve=prior),
                worst={k: {f"{a:.0%}": round(worst(rows, a, k), 4) for a in AFTER} for k in names},
                median_from_10={k: round(median_error(rows, 0.1, k), 4) for k in names},
                rows=rows,
            )
            final = PrefillClock(*points[0], prior=prior)
            for d, t in points[1:]:
                final.done(d, t)
            previous = final.fit()
    return result


def summary(result: dict) -> str:
    lines = []
    for clock_time in ("wall", "cpu"):
        for doc in result["documents"]:
            if clock_time not in doc:
                continue
            d = doc[clock_time]
            lines.append(f"{doc['kind']} {doc['tokens']:,} tokens, {doc['prefill_s']:.0f} s, on {clock_time} time "
                         f"(prior: {d['prior']['source']}):")  # fmt: skip
            for k, w in d["worst"].items():
                lines.append(f"  {k:28s} worst error from " + ", ".join(f"{a}: {e:4.0%}" for a, e in w.items())
                             + f"; median from 10%: {d['median_from_10'][k]:4.0%}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, EngineSettings())
    p.add_argument("--essays", help="directory of the essays' *.txt files (documents of kind essays)")
    p.add_argument("--docs", nargs="+", default=["essays:8192"], help="KIND:TOKENS, pre-filled in this order")
    p.add_argument("--replay", help="re-score this result file's recorded points (no engine is loaded)")
    p.add_argument("--replay-to", help="write the re-scored result here (default: over the --replay file)")
    p.add_argument(
        "--sweep", nargs="+", help="replay variants of the clock on these result files (no engine)"
    )
    p.add_argument(
        "--probe-only", type=int, metavar="N", help="time the warm-up and the app's probe, N times each"
    )
    p.add_argument("--tag", default="", help="added to the result file's name")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    if a.replay:
        result = score(json.loads(Path(a.replay).read_text()))
        Path(a.replay_to or a.replay).write_text(json.dumps(result, indent=1) + "\n")
        print(summary(result))
        return 0
    if a.sweep:
        path, result = write_result(a.out, "eta-sweep", "cpu", datetime.date.today().isoformat(), 0.0, argv,
                                    sweep(a.sweep), module="eta")  # fmt: skip
        for v in result["variants"]:
            print(v["knobs"] or "the app's", " ".join(f"{d['worst'][0]:.0%}" for d in v["documents"]))
        return 0
    docs = [(kind, int(n)) for kind, n in (d.split(":") for d in a.docs)]
    settings = settings_from_args(a, EngineSettings())
    if settings.max_tokens is None:
        settings = dataclasses.replace(settings, max_tokens=max(n for _, n in docs) + 2048)
    engine = Engine.from_settings(settings)
    if a.probe_only:  # what the app's prior adds to its warm-up
        runs = []
        for _ in range(a.probe_only):
            t0 = time.perf_counter()
            engine.warm_up()
            t1 = time.perf_counter()
            chunk_s = engine.chunk_seconds(PrefillClock.PROBE)
            runs.append(dict(warm_up_s=t1 - t0, probe_s=time.perf_counter() - t1, chunk_s=chunk_s,
                             load=os.getloadavg()[0]))  # fmt: skip
            print(
                f"warm-up {t1 - t0:.1f} s, probe {runs[-1]['probe_s']:.1f} s: {[round(c, 2) for c in chunk_s]}"
            )
        fields = dict(model=engine.stats()["model"], chunk_size=engine.chunk_size, threads=torch.get_num_threads(),
                      prefixes=list(PrefillClock.PROBE), runs=runs)  # fmt: skip
        write_result(a.out, f"eta-probe-{fields['model'].lower()}", "cpu", datetime.date.today().isoformat(), 0.0,
                     argv, fields, module="eta")  # fmt: skip
        return 0
    warm_up_s = engine.warm_up()
    t0 = time.perf_counter()
    app_s = engine.chunk_seconds(PrefillClock.PROBE)  # what the app's warm-up times, and how long it takes
    t1 = time.perf_counter()
    chunk_s = engine.chunk_seconds(PROBE)
    t2 = time.perf_counter()
    warm_cache = engine.chunk_seconds(
        PROBE, cold=False
    )  # an alternative: the block's keys left in the CPU caches
    probe = dict(prefixes=list(PROBE), chunk_s=chunk_s, seconds=t2 - t1, warm_cache_chunk_s=warm_cache,
                 app=dict(prefixes=list(PrefillClock.PROBE), chunk_s=app_s, seconds=t1 - t0))  # fmt: skip
    print(
        f"warm-up {warm_up_s:.1f} s; the app's probe {t1 - t0:.1f} s: " + ", ".join(f"{g:.2f}" for g in app_s)
    )
    print("probe (cold caches): " + ", ".join(f"{g:.2f}" for g in chunk_s))
    print("probe (warm caches): " + ", ".join(f"{g:.2f}" for g in warm_cache), flush=True)
    documents = []
    for kind, n in docs:
        ids = document_ids(engine, doc_text(kind, a.essays), n)
        documents.append(dict(kind=kind, **record(engine, ids)))
        print(f"{kind} {n:,}: {documents[-1]['prefill_s']:.0f} s", flush=True)
    fields = dict(model=engine.stats()["model"], chunk_size=engine.chunk_size, threads=torch.get_num_threads(),
                  warm_up_s=warm_up_s, probe=probe, documents=documents)  # fmt: skip
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    path, result = write_result(a.out, "-".join(["eta", fields["model"].lower(), *filter(None, [a.tag])]), device, datetime.date.today().isoformat(),
                                0.0, argv, fields, module="eta")  # fmt: skip
    result = score(result)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
