"""``python -m duo_qserve quantize SRC DST``: quantize a checkpoint to W8A8 once, so later loads skip the work;
with ``--stats-only``, write only the W8A8 recipe (``quant.recipe``: SmoothQuant activation statistics and, with
``--rotate``, ``--per-layer-alpha`` or ``--keep-16bit N``, the choices made on calibration text), which the engine
applies when it quantizes on the fly (those shipped in ``duo_qserve/quant/calibration/`` are made this way). The
calibration text defaults to the essays' calibration split (``duo_qserve.data``), which no evaluation reads."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from duo_qserve.data import essay_files, read_texts
from duo_qserve.loading import load_model
from duo_qserve.quant.recipe import make_recipe, save_recipe
from duo_qserve.quant.w8a8 import DEFAULT_ALPHA, quantize_model_w8a8, save_quantized

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def calibration_ids(tokenizer, paths: list[Path], n_tokens: int) -> torch.Tensor:
    """Token ids of calibration text: files, and every .txt file of directories, in order, up to ``n_tokens``."""
    files = [f for p in paths for f in (sorted(p.glob("*.txt")) if p.is_dir() else [p])]
    ids = tokenizer(read_texts(files), add_special_tokens=False)["input_ids"][:n_tokens]
    if not ids:
        raise ValueError(f"{' '.join(map(str, paths))}: no calibration text found")
    return torch.tensor(ids)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="duo_qserve quantize", description=__doc__)
    p.add_argument("src", help="'default', a checkpoint directory or a .gguf file")
    p.add_argument("dst", help="output directory")
    p.add_argument(
        "--calibration", type=Path, nargs="+", default=None,
        help="text files or directories for SmoothQuant (default: the calibration split of $DUO_QSERVE_ESSAYS)",
    )  # fmt: skip
    p.add_argument(
        "--no-smoothing", action="store_true", help="W8A8 without SmoothQuant (no calibration text)"
    )
    p.add_argument("--stats-only", action="store_true", help="write DST as a W8A8 recipe file (.safetensors)")
    p.add_argument("--rotate", action="store_true", help="recipe: Hadamard rotation (with --stats-only)")
    p.add_argument(
        "--per-layer-alpha",
        action="store_true",
        help="recipe: SmoothQuant alpha per layer (with --stats-only)",
    )
    p.add_argument(
        "--keep-16bit",
        type=int,
        default=0,
        help="recipe: N most sensitive linears in 16-bit (with --stats-only)",
    )
    p.add_argument("--calibration-tokens", type=int, default=2048)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    choices = a.rotate or a.per_layer_alpha or a.keep_16bit
    if choices and not a.stats_only:
        p.error("a saved checkpoint records no rotation, per-layer alpha or 16-bit linears: use --stats-only")
    if a.no_smoothing and not a.stats_only and a.calibration:
        p.error("--no-smoothing takes no calibration text")
    if a.no_smoothing and a.stats_only and (a.per_layer_alpha or not a.rotate):
        p.error("a recipe with --no-smoothing must --rotate, and has no alpha to choose")
    needs_text = not a.no_smoothing or a.keep_16bit
    paths = (a.calibration or essay_files("calibration")) if needs_text else []
    loaded = load_model(a.src, a.device)
    model = loaded.model
    if getattr(model, "w8a8", None) is not None:
        raise ValueError(f"{a.src} is already quantized")
    calib = calibration_ids(loaded.tokenizer, paths, a.calibration_tokens).to(a.device) if paths else None
    if a.stats_only:
        text = " ".join(p.name for p in paths)
        recipe = make_recipe(
            model, calib, rotate=a.rotate, smooth=not a.no_smoothing, per_layer_alpha=a.per_layer_alpha,
            keep_16bit=a.keep_16bit,
        )  # fmt: skip
        tokens = 0 if calib is None else len(calib)
        save_recipe(a.dst, recipe, {"text": text, "tokens": str(tokens)})
        print(f"wrote {a.dst} (W8A8 recipe {sorted(recipe)} from {tokens} tokens of {text or 'no text'})")
        return 0
    quantize_model_w8a8(model, calib, a.alpha)
    dst = Path(a.dst)
    config = model.args.to_hf_config()
    save_quantized(model, config, dst)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    src = Path(loaded.source)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    print(
        f"wrote {dst} (W8A8, {'SmoothQuant alpha=' + str(a.alpha) if calib is not None else 'no smoothing'})"
    )
    return 0
