"""How right the pre-fill's "time left" is: pre-fill a real document, and at every chunk compare what the app's
clock (``duo_qserve.eta.PrefillClock``, fed exactly as the app feeds it) would have shown with the time that
actually remained.

Reports the largest relative error once at least ``--after`` of the document is done (the promise: within 20% from
10% on), the error at each tenth, and the constant-rate estimate (tokens so far over seconds so far) beside it.

    python -m duo_qserve.bench.eta --model default --cpu --text-dir DIR --tokens 7000 --chunk-size 256
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import torch

from duo_qserve.bench.common import write_result
from duo_qserve.bench.engine_speed import document_ids
from duo_qserve.engine import Engine, EngineSettings
from duo_qserve.eta import PrefillClock
from duo_qserve.options import add_engine_args, settings_from_args


def replay(points: list[tuple[int, float]], total: int) -> list[dict]:
    """One row per progress point (tokens done, time) between the first and the last: the clock's estimate, a
    constant rate's, and the time that really remained until the last."""
    (start_tokens, start), end = points[0], points[-1][1]
    clock, rows = PrefillClock(start_tokens, start), []
    for done, at in points[1:-1]:
        clock.done(done, at)
        actual = end - at
        rate = (at - start) / (done - start_tokens) * (total - done)
        rows.append(dict(fraction_done=done / total, actual_s=actual, clock_s=clock.seconds_left(total),
                         constant_rate_s=rate))  # fmt: skip
    return rows


def worst(rows: list[dict], after: float, key: str) -> float:
    return max(
        (abs(r[key] - r["actual_s"]) / r["actual_s"] for r in rows if r["fraction_done"] >= after), default=0
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, EngineSettings())
    p.add_argument("--text-dir", required=True, help="directory of *.txt files the document is cut from")
    p.add_argument("--tokens", type=int, default=7000, help="document tokens")
    p.add_argument("--after", type=float, default=0.1, help="report the worst error from this fraction on")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    settings = settings_from_args(a, EngineSettings())
    if settings.max_tokens is None:
        settings = dataclasses.replace(settings, max_tokens=a.tokens + 2048)
    engine = Engine.from_settings(settings)
    text = "\n\n".join(f.read_text(errors="replace") for f in sorted(Path(a.text_dir).glob("*.txt")))
    ids = document_ids(engine, text, a.tokens)
    points: list[tuple[int, float]] = []  # as the app: its clock starts at the first chunk's report
    info = engine.ingest(ids, on_progress=lambda done, total: points.append((done, time.perf_counter())))
    rows = replay(points, len(ids))
    fields = dict(model=engine.stats()["model"], tokens=len(ids), chunk_size=engine.chunk_size,
                  prefill_s=info.prefill_seconds, after=a.after,
                  worst_clock=worst(rows, a.after, "clock_s"), worst_constant_rate=worst(rows, a.after, "constant_rate_s"),
                  rows=rows)  # fmt: skip
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    write_result(a.out, "eta-" + fields["model"].lower(), device, datetime.date.today().isoformat(), 0.0, argv,
                 fields, module="eta")  # fmt: skip
    for r in rows[:: max(len(rows) // 10, 1)]:
        print(f"{r['fraction_done']:5.0%} done: {r['actual_s']:7.1f} s left, clock {r['clock_s']:7.1f} s, "
              f"constant rate {r['constant_rate_s']:7.1f} s")  # fmt: skip
    print(f"worst error from {a.after:.0%} on: clock {fields['worst_clock']:.0%}, "
          f"constant rate {fields['worst_constant_rate']:.0%} ({fields['prefill_s']:.0f} s pre-fill)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
