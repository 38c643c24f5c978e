"""Needle in a haystack: does a configuration still find one fact hidden in a long document?

A needle carrying a random key (a number) is inserted at a depth of a haystack (Paul Graham essays, or the classic
passkey filler in ``--mode passkey``) cut to a context length; the engine ingests the document once and answers one
question; a trial scores 1 if the key appears in the answer (exact match of the key's digits). Every configuration
runs the same grid (context lengths x depths, same keys) with one engine reused across the grid, and the results go
to ``benchmarks/results/niah-<name>-<date>.json`` plus one heat map per configuration.

Run: ``python -m duo_qserve.eval.niah --name smollm2 --configs full,duo-trained,duo-random,duo-scored,streaming``.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from duo_qserve.bench.common import commit
from duo_qserve.loading import REPO_ROOT
from duo_qserve.train_patterns import HAYSTACK_DIR

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
NEEDLE = "The secret number is {key}."
QUESTION = "According to the document, what is the secret number?"
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"


@dataclass
class Config:
    """One engine configuration under test (``engine`` holds ``Engine.from_pretrained`` keyword arguments)."""

    name: str
    engine: dict
    note: str = ""


@dataclass
class Grid:
    lengths: list[int]
    depths: list[float]  # percent of the haystack before the needle
    trials: int = 1
    seed: int = 0
    keys: dict = field(default_factory=dict)  # (length, depth, trial) -> key, shared by every configuration

    def key(self, length: int, depth: float, trial: int) -> str:
        """A 7-digit key per cell and trial, the same for every configuration."""
        cell = (length, depth, trial)
        if cell not in self.keys:
            self.keys[cell] = str(
                random.Random(f"{self.seed}-{length}-{depth}-{trial}").randrange(10**6, 10**7)
            )
        return self.keys[cell]


def score_answer(answer: str, key: str) -> float:
    """1.0 if the key's digits appear as a whole number in the answer (commas/spaces inside it allowed), else 0."""
    numbers = re.findall(r"\d[\d,\s]*\d|\d", answer)
    return float(any(re.sub(r"[,\s]", "", n) == key for n in numbers))


def insert_needle(hay_ids: list[int], needle_ids: list[int], depth: float) -> list[int]:
    """Put the needle after ``depth`` percent of the haystack tokens (at 100% it goes at the end)."""
    at = int(len(hay_ids) * depth / 100)
    return hay_ids[:at] + needle_ids + hay_ids[at:]


def haystack_text(haystack_dir: Path, n_chars: int) -> str:
    """Essays concatenated (repeated if needed) to at least ``n_chars`` characters."""
    files = sorted(Path(haystack_dir).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no haystack essays (*.txt) in {haystack_dir}")
    parts, total = [], 0
    while total < n_chars:
        for f in files:
            parts.append(f.read_text(errors="replace"))
            total += len(parts[-1])
            if total >= n_chars:
                break
    return "\n\n".join(parts)


def build_document(
    tokenizer, hay_ids: list[int], needle: str, length: int, depth: float, overhead: int
) -> str:
    """The document text: ``length`` tokens in all (``overhead`` = template + question tokens) with the needle."""
    needle_ids = tokenizer(" " + needle + " ", add_special_tokens=False)["input_ids"]
    n_hay = length - overhead - len(needle_ids)
    if n_hay <= 0:
        raise ValueError(f"context length {length} leaves no room for a haystack")
    return tokenizer.decode(insert_needle(hay_ids[:n_hay], needle_ids, depth))


def run_grid(engine, grid: Grid, hay_ids: list[int], needle: str, question: str, log=print) -> list[dict]:
    """Every (length, depth, trial) of the grid on one engine; returns one record per trial."""
    tok = engine.tokenizer
    overhead = len(engine.document_ids("")) + len(engine.encode(question + engine._question_suffix))
    records = []
    for length in grid.lengths:
        for depth in grid.depths:
            for trial in range(grid.trials):
                key = grid.key(length, depth, trial)
                doc = build_document(tok, hay_ids, needle.format(key=key), length, depth, overhead)
                t0 = time.perf_counter()
                info = engine.ingest(doc)
                answer = engine.answer(question, max_new_tokens=16)
                score = score_answer(answer, key)
                records.append(
                    dict(length=length, depth=depth, trial=trial, tokens=info.tokens, key=key, answer=answer,
                         score=score, seconds=round(time.perf_counter() - t0, 2))
                )  # fmt: skip
                log(f"  len {length:>5} depth {depth:>5.1f}% key {key}: {score:.0f}  {answer.strip()[:60]!r}")
    return records


def score_table(records: list[dict], grid: Grid) -> np.ndarray:
    """Mean score per cell: [depths, lengths]."""
    table = np.zeros((len(grid.depths), len(grid.lengths)))
    for i, d in enumerate(grid.depths):
        for j, n in enumerate(grid.lengths):
            cell = [r["score"] for r in records if r["depth"] == d and r["length"] == n]
            table[i, j] = np.mean(cell)
    return table


def heat_map(table: np.ndarray, grid: Grid, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(grid.lengths) + 2.5, 0.5 * len(grid.depths) + 2))
    im = ax.imshow(table, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(grid.lengths)), [str(n) for n in grid.lengths])
    ax.set_yticks(range(len(grid.depths)), [f"{d:g}" for d in grid.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(f"{title}\nmean score {table.mean():.2f}", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def write_results(out: Path, meta: dict, results: list[dict], append: bool = False) -> Path:
    """Write the results file; with ``append``, merge into the file as it is now (its other configurations and
    command kept), so runs of different configurations, even concurrent ones, end up in one file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(out.parent, os.O_RDONLY)  # concurrent runs appending to one file take turns (dir lock)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if append and out.is_file():
            old = json.loads(out.read_text())
            mine = meta["command"]
            command = old["command"] if mine in old["command"] else old["command"] + " && " + mine
            meta = meta | {"command": command}
            mine = {r["name"] for r in results}
            results = [r for r in old["configurations"] if r["name"] not in mine] + results
        out.write_text(json.dumps(meta | {"configurations": results}, indent=2) + "\n")
    finally:
        os.close(lock)  # closing releases the lock
    return out


def standard_configs(args: argparse.Namespace) -> dict[str, Config]:
    """The comparison: full attention, DuoAttention with the trained / random / fast-scored patterns, and
    all-streaming. Every streaming configuration uses the same sink/recent/chunk so only the pattern differs."""
    from duo_qserve.patterns import random_pattern, save_pattern

    common = dict(
        device=args.device, chunk_size=args.chunk_size, sink=args.sink, recent=args.recent,
        max_tokens=max(args.lengths_list) + 2048,  # the engine keeps 1024 tokens for questions and answers
    )  # fmt: skip
    random_dir = REPO_ROOT / "test-output" / "niah" / "random-pattern"
    if "duo-random" in args.configs:
        from duo_qserve.model import ModelArgs

        shape = ModelArgs.from_name("smollm2-135m") if args.model == "default" else None
        if shape is None:
            raise SystemExit("duo-random needs the default model's shape; pass --configs without it")
        save_pattern(
            random_dir, random_pattern(shape, seed=0).gates, {"source": "patterns.random_pattern(seed=0)"}
        )
    w8 = args.w8a8
    quant = "W8A8KV4" if w8 else "KV4"
    duo = dict(sparsity=args.sparsity, kv_bits=4, w8a8=w8, dtype=args.dtype, **common)
    return {
        "full": Config(
            "full",
            dict(pattern=None, kv_bits=16, w8a8=False, dtype=torch.float32, **common),
            "full attention, fp32 weights and KV",
        ),
        "full-quantized": Config(
            "full-quantized",
            dict(duo, pattern=args.trained, sparsity=0.0),
            f"every head a retrieval head, {quant}: what quantization alone costs",
        ),
        "duo-trained": Config("duo-trained", dict(pattern=args.trained, **duo), f"trained, {quant}"),
        "duo-trained-kv4": Config(
            "duo-trained-kv4",
            dict(duo, pattern=args.trained, w8a8=False),
            "trained, KV4, unquantized weights",
        ),
        "duo-random": Config("duo-random", dict(pattern=str(random_dir), **duo), f"random, {quant}"),
        "duo-scored": Config("duo-scored", dict(pattern=args.scored, **duo), f"fast-scored, {quant}"),
        "streaming": Config(
            "streaming", dict(duo, pattern=args.trained, sparsity=1.0), f"all streaming, {quant}"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m duo_qserve.eval.niah", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="smollm2", help="results file: niah-<name>-<date>.json")
    p.add_argument("--model", default="default")
    p.add_argument("--configs", default="full,duo-trained,duo-random,duo-scored,streaming")
    p.add_argument("--lengths", default="1024,2048,3072")
    p.add_argument("--depths", default="0,25,50,75,100")
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--sink", type=int, default=16)
    p.add_argument("--recent", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--trained", default=str(REPO_ROOT / "attn_patterns" / "SmolLM2-135M-Instruct"))
    p.add_argument("--scored", default=str(REPO_ROOT / "test-output" / "niah" / "scored-pattern"))
    p.add_argument("--mode", choices=("needle", "passkey"), default="needle")
    p.add_argument("--needle", default=None, help="needle text with {key}")
    p.add_argument("--question", default=None)
    p.add_argument("--haystack-dir", default=str(HAYSTACK_DIR))
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--dtype", default=None, choices=("float32", "float16", "bfloat16"),
        help="DuoAttention configurations' dtype (default: float32 on CPU, float16 on CUDA); full is float32",
    )  # fmt: skip
    p.add_argument(
        "--w8a8", action=argparse.BooleanOptionalAction, default=None,
        help="DuoAttention configurations with W8A8 weights (default: on for CUDA, off for CPU)",
    )  # fmt: skip
    p.add_argument(
        "--append",
        action="store_true",
        help="merge into today's results file (a configuration run again replaces its old entry)",
    )
    a = p.parse_args(argv)
    a.configs = a.configs.split(",")
    a.lengths_list = [int(x) for x in a.lengths.split(",")]
    a.dtype = getattr(torch, a.dtype or ("float16" if a.device == "cuda" else "float32"))
    a.w8a8 = a.device == "cuda" if a.w8a8 is None else a.w8a8

    from duo_qserve.engine import Engine

    grid = Grid(a.lengths_list, [float(x) for x in a.depths.split(",")], a.trials, a.seed)
    if a.mode == "passkey":
        needle, question = a.needle or PASSKEY_NEEDLE, a.question or PASSKEY_QUESTION
        hay = PASSKEY_FILLER * (max(grid.lengths) // 10)
    else:
        needle, question = a.needle or NEEDLE, a.question or QUESTION
        hay = haystack_text(Path(a.haystack_dir), max(grid.lengths) * 6)
    configs = standard_configs(a)
    date = datetime.date.today().isoformat()
    out = Path(a.out_dir) / f"niah-{a.name}-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=device_name(a.device), date=date, commit=commit(),
        command="python -m duo_qserve.eval.niah " + " ".join(argv if argv is not None else sys.argv[1:]),
        model=a.model, mode=a.mode, needle=needle, question=question, lengths=grid.lengths, depths=grid.depths,
        trials=grid.trials, scoring="1 if the needle's 7-digit key appears in the answer, else 0",
        sink=a.sink, recent=a.recent, chunk_size=a.chunk_size, sparsity=a.sparsity, dtype=str(a.dtype), w8a8=a.w8a8,
    )  # fmt: skip
    results = []
    for name in a.configs:
        cfg = configs[name]
        print(f"{name}: {cfg.note} {cfg.engine}", flush=True)
        t0 = time.perf_counter()
        try:
            engine = Engine.from_pretrained(a.model, **cfg.engine)
            hay_ids = engine.encode(hay)
            records = run_grid(engine, grid, hay_ids, needle, question, log=lambda m: print(m, flush=True))
        except Exception as e:  # e.g. W8A8 not available on this device: record it and go on
            print(f"  skipped: {type(e).__name__}: {e}", flush=True)
            results.append(dict(name=name, note=cfg.note, skipped=f"{type(e).__name__}: {e}"))
            continue
        table = score_table(records, grid)
        png = out.with_name(f"{out.stem}-{name}.png")
        heat_map(table, grid, f"NIAH {a.model} / {name} ({cfg.note})", png)
        results.append(
            dict(name=name, note=cfg.note, mean_score=float(table.mean()), pattern=engine.pattern.name,
                 sparsity=engine.sparsity, kv_bits=engine.cache_config.kv_bits, w8a8=engine.w8a8,
                 smoothquant=engine.stats()["smoothquant"],
                 sink=engine.cache_config.sink_tokens, recent=engine.cache_config.recent_tokens,
                 chunk_size=engine.chunk_size, retrieval_heads=engine.retrieval_heads,
                 grid=table.tolist(), heat_map=png.name, seconds=round(time.perf_counter() - t0, 1),
                 trials=records)
        )  # fmt: skip
        write_results(
            out, meta, results, a.append
        )  # after every configuration, so a cut-off run keeps what it has
        print(f"  {name}: mean score {table.mean():.3f}", flush=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
