"""What a user of a real model waits for, measured through ``Engine`` on real text: pre-fill tokens/s of a whole
document, the time from a question to its first answer token, and decode ms/token against the decode floor.

The engine is warmed up first, as the app does at load (``Engine.warm_up``: kernels compiled and tuned, a decode
graph captured), and the warm-up's seconds are reported. Then it answers once about a short document, reported on
its own (the first answer a user gets), and for each context length a document of that many tokens (text files,
repeated as needed) is ingested and one question answered. With ``--evidence`` every answer also finds its
passages, and that pass's seconds are reported. The floor of a decode step is the bytes it must read (every weight
but the embedding, plus the cache at that context) over the measured copy bandwidth.

    python -m duo_qserve.bench.engine_speed --model qwen2.5-coder-1.5b --text-dir DIR --contexts 8192,16384,32768
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import sys
import time
from pathlib import Path

import torch

from duo_qserve.bench.common import gpu_header, write_result
from duo_qserve.cache import CacheSpec
from duo_qserve.engine import Engine, EngineSettings
from duo_qserve.options import add_engine_args, settings_from_args

DEFAULTS = EngineSettings(w8a8=True)  # the served configuration on a GPU

QUESTION = "In two sentences, what is the first part of the document about?"


def decode_bytes(engine, context: int) -> int:
    """Bytes one decode step reads at ``context`` tokens: every weight except the embedding table (one row of it
    is read; a tied lm_head reads it in full) plus the whole cache up to ``context``."""
    model, seen, total = engine.model, set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "embed_tokens" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    if model.args.tie_word_embeddings:
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    spec = engine.cache.spec
    return total + CacheSpec(spec.args, spec.retrieval_heads, spec.config, context, spec.dtype).nbytes


def document_ids(engine, text: str, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` document prompt tokens (template included) of ``text``, repeated as needed."""
    ids = engine.encode(text)
    overhead = len(engine.document_ids(""))
    body = (ids * (n_tokens // max(len(ids), 1) + 1))[: n_tokens - overhead]
    doc = engine.document_ids(engine.tokenizer.decode(body))
    return doc[:n_tokens]


def answer_once(engine, max_new_tokens: int, evidence: bool) -> dict:
    t0 = time.perf_counter()
    answer = engine.answer(QUESTION, max_new_tokens=max_new_tokens, evidence=evidence)
    wall = time.perf_counter() - t0
    last = engine.last
    return {
        "ttft_s": last.ttft_s, "decode_ms_per_token": last.decode_ms_per_token,
        "answer_tokens": last.answer_tokens, "evidence_s": last.evidence_s if evidence else None,
        "answer_s": wall, "answer": answer,
    }  # fmt: skip


def run(args) -> dict:
    if torch.cuda.is_available():
        device, date, copy = gpu_header()
    else:  # a smoke run: no copy ceiling, so no floor
        device, date, copy = "cpu", datetime.date.today().isoformat(), 0.0
    text = "\n\n".join(f.read_text(errors="replace") for f in sorted(Path(args.text_dir).glob("*.txt")))
    contexts = [int(c) for c in args.contexts.split(",")]
    settings = settings_from_args(args, DEFAULTS)
    if settings.max_tokens is None:
        settings = dataclasses.replace(settings, max_tokens=max(contexts) + 2048)
    engine = Engine.from_settings(settings)
    warm_up_s = engine.warm_up()
    t0 = time.perf_counter()
    engine.ingest(document_ids(engine, text, 1024))
    first = answer_once(engine, args.max_new_tokens, args.evidence)
    first |= {"ingest_and_answer_s": time.perf_counter() - t0}
    print(f"warm-up {warm_up_s:.1f} s; first answer after it:", first, flush=True)
    rows = []
    for n in contexts:
        ids = document_ids(engine, text, n)
        info = engine.ingest(ids)
        row = {
            "context": len(ids),
            "prefill_s": info.prefill_seconds,
            "prefill_tok_per_s": len(ids) / info.prefill_seconds,
        }
        row |= answer_once(engine, args.max_new_tokens, args.evidence)
        floor_ms = decode_bytes(engine, len(ids)) / (copy * 1e9) * 1000 if copy else None
        ratio = row["decode_ms_per_token"] / floor_ms if floor_ms else None
        row |= {"floor_ms": floor_ms, "decode_over_floor": ratio}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "answer"}, flush=True)
    stats = engine.stats()
    return {
        "model": stats["model"], "pattern": stats["pattern"], "sparsity": stats["sparsity"],
        "w8a8": stats["w8a8"], "smoothquant": stats["smoothquant"], "kv_bits": stats["kv_bits"],
        "sink_tokens": stats["sink_tokens"], "recent_tokens": stats["recent_tokens"],
        "chunk_size": engine.chunk_size, "decode_graph": engine.decode_graph, "question": QUESTION,
        "warm_up_s": warm_up_s, "first_answer": first, "rows": rows, "memory": stats["memory"],
    }, (device, date, copy)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, DEFAULTS)
    p.add_argument("--text-dir", required=True, help="directory of *.txt files the documents are cut from")
    p.add_argument("--contexts", default="8192,16384,32768")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--evidence", action="store_true", help="every answer also finds its passages (timed)")
    p.add_argument("--name", default=None, help="result file kind (default: engine-speed-<model>)")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args(argv)
    fields, (device, date, copy) = run(a)
    kind = a.name or "engine-speed-" + re.sub(r"[^a-z0-9]+", "-", fields["model"].lower())
    write_result(a.out, kind, device, date, copy, argv, fields, module="engine_speed")
    for r in fields["rows"]:
        floor = (
            f"{r['floor_ms']:.3f} ms floor ({r['decode_over_floor']:.2f}x)" if r["floor_ms"] else "no floor"
        )
        print(f"{r['context']:>7} tokens: pre-fill {r['prefill_tok_per_s']:.0f} tok/s, first token "
              f"{r['ttft_s']:.3f} s, {r['decode_ms_per_token']:.3f} ms/token, {floor}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
