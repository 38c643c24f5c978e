"""The engine's command-line options, defined once for every tool that builds an engine.

``python -m duo_qserve ask/info``, ``python -m duo_qserve library save/load``, the app (``python -m app.main``) and
the benchmarks add them with ``add_engine_args`` and turn them into ``EngineSettings`` with ``settings_from_args``;
``parse_pattern`` is the only reader of a pattern's name.
"""

from __future__ import annotations

import argparse
import dataclasses

from duo_qserve.engine import EngineSettings

# option -> EngineSettings field; "--cpu" (the device) and "--w8a8" (a flag) are added apart
_VALUED = {
    "--model": "model",
    "--pattern": "pattern",
    "--sparsity": "sparsity",
    "--kv-bits": "kv_bits",
    "--key-group": "key_group",
    "--sink": "sink",
    "--recent": "recent",
    "--chunk-size": "chunk_size",
    "--max-tokens": "max_tokens",
    "--w8a8-recipe": "smoothing",
}
DEFAULTS = EngineSettings()


def parse_pattern(name: str | None) -> str | None:
    """The ``EngineSettings.pattern`` a user's pattern name means: "none" (any case) is None, every head a
    retrieval head; blank is "auto", the model's shipped pattern if any; anything else is a pattern directory."""
    name = (name or "").strip()
    if name.lower() == "none":
        return None
    return name or "auto"


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def add_engine_args(parser: argparse.ArgumentParser, defaults: EngineSettings | None = DEFAULTS) -> None:
    """Add the engine options to ``parser``. ``defaults`` gives what an option left out means (shown in the help);
    None leaves every option unset, so ``settings_from_args`` keeps its ``base`` (a saved book's settings)."""

    def default(field: str):
        return None if defaults is None else getattr(defaults, field)

    def shown(field: str, meaning: str = "") -> str:
        if defaults is None:
            return "default: the book's"
        value = default(field)
        return f"default: {meaning}" if value is None and meaning else f"default: {value}"

    helps = {
        "--model": "a named model (python -m duo_qserve models list; 'demo': the demo's model for the device), a "
        "checkpoint dir, a .gguf file or synthetic:<shape>; " + shown("model"),
        "--pattern": "attention pattern dir; 'auto': attn_patterns/<model>/ if there is one; 'none': every head a "
        "retrieval head; " + shown("pattern"),
        "--sparsity": "fraction of KV heads that become streaming heads (0..1); " + shown("sparsity"),
        "--kv-bits": "bits of the retrieval heads' KV cache; " + shown("kv_bits"),
        "--key-group": "tokens per key quantization group; " + shown("key_group"),
        "--sink": "attention-sink tokens of streaming heads; " + shown("sink", "the pattern's"),
        "--recent": "recent-window tokens of streaming heads; " + shown("recent", "the pattern's"),
        "--chunk-size": "pre-fill chunk in tokens; " + shown("chunk_size", "32768 on CUDA, 512 on CPU"),
        "--max-tokens": "cache capacity in tokens; "
        + shown("max_tokens", "what fits on the GPU, 32768 on CPU"),
        "--w8a8-recipe": "how W8A8 prepares the model: a recipe file (rotation, SmoothQuant statistics); 'auto': "
        "the one shipped for the model, if any; 'none': plain W8A8; " + shown("smoothing"),
    }
    types = {"--sparsity": _fraction, "--kv-bits": int, "--key-group": int, "--sink": int, "--recent": int,
             "--chunk-size": int, "--max-tokens": int}  # fmt: skip
    for option, field in _VALUED.items():
        extra = {"choices": (4, 8, 16)} if option == "--kv-bits" else {}
        parser.add_argument(
            option, default=default(field), type=types.get(option, str), help=helps[option], **extra
        )
    parser.add_argument(
        "--w8a8", action=argparse.BooleanOptionalAction, default=default("w8a8"),
        help="int8 weights and activations; " + shown("w8a8", "on for CUDA, off for CPU"),
    )  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")


def settings_from_args(args: argparse.Namespace, base: EngineSettings | None = None) -> EngineSettings:
    """``base`` (default: ``DEFAULTS``) with every engine option the command line set. ``--pattern`` goes
    through ``parse_pattern``; ``--model demo`` becomes the demo's model for the device; ``--cpu`` runs on the CPU
    at its default dtype (a book saved from a GPU keeps its other settings)."""
    from duo_qserve.models import demo_model

    settings = base or DEFAULTS
    given = {f: getattr(args, o[2:].replace("-", "_")) for o, f in _VALUED.items()} | {"w8a8": args.w8a8}
    given = {k: v for k, v in given.items() if v is not None}
    if "pattern" in given:
        given["pattern"] = parse_pattern(given["pattern"])
    if given.get("smoothing", "").lower() == "none":
        given["smoothing"] = None
    if args.cpu:
        given |= {"device": "cpu", "dtype": None}
    settings = dataclasses.replace(settings, **given)
    if settings.model == "demo":
        settings = dataclasses.replace(settings, model=demo_model(args.cpu))
    return settings
