"""W8A8 perplexity against 16-bit on held-out text: what weight and activation quantization cost a named model.

SmoothQuant is calibrated on the essays' calibration split (``duo_qserve.data``); perplexity is measured on text
calibration never saw: the essays' evaluation split, and the pydocs haystack (technical text of another kind). Each
evaluation window is scored on its own (no context carried between windows), every token after its first
predicted. Rows: 16-bit (fp16 on CUDA, fp32 on CPU) and 16-bit rotated (``quant.rotation``: the same function, a
check), then W8A8: without smoothing; with SmoothQuant calibrated here at each ``--alphas`` value and with an alpha
per layer chosen on the calibration text (``quant.search.choose_alphas``); with the statistics shipped for the
model (the W8A8 recipe the engine applies, ``quant.recipe``), if any; rotated (residual Hadamard folded offline,
online Hadamard before down_proj), alone and with SmoothQuant at each ``--alphas`` value and per layer; and, for
each ``--keep-16bit N``, per-layer SmoothQuant and rotation with the N linears most sensitive on the calibration
text (``quant.search``) kept in 16-bit. ``--skip`` leaves out the rows whose name contains any of its words.

    python -m duo_qserve.eval.perplexity --model qwen2.5-coder-1.5b --device cuda [--alphas 0.5,0.7,0.85]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

from duo_qserve import data
from duo_qserve.cache import FullKVCache
from duo_qserve.engine import CALIBRATION_DIR
from duo_qserve.environment import REPO_ROOT
from duo_qserve.eval.common import result_header, write_json
from duo_qserve.loading import load_model
from duo_qserve.quant.recipe import quantize_with_recipe
from duo_qserve.quant.rotation import rotate_model
from duo_qserve.quant.search import choose_alphas, linear_sensitivity, most_sensitive
from duo_qserve.quant.w8a8 import activation_absmax, quantize_model_w8a8, smooth_model


@torch.inference_mode()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = model(ids, FullKVCache(model.args, len(ids), ids.device, model.embed_tokens.weight.dtype))
        nll += torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m duo_qserve.eval.perplexity", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="default", help="a named model, a checkpoint directory or a .gguf file")
    p.add_argument("--essays", default=None, help="essays directory (default: $DUO_QSERVE_ESSAYS)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--calib-tokens", type=int, default=8192, help="calibration tokens (the shipped statistics': 8192)"
    )
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens per text")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument(
        "--alphas", default="0.3,0.5,0.7,0.85", help="SmoothQuant alphas, comma-separated (empty: none)"
    )
    p.add_argument(
        "--keep-16bit", default="8", help="numbers of most sensitive linears kept in 16-bit, comma-separated"
    )
    p.add_argument(
        "--skip", default="", help="leave out rows whose name contains one of these, comma-separated"
    )
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results", help="directory")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    texts = {"essays": data.essay_text("evaluation", a.essays), "pydocs": data.pydocs_text()}
    calib_files = data.essay_files("calibration", a.essays)
    base = load_model(a.model, a.device)
    tok = base.tokenizer

    def ids_of(text: str, n: int) -> torch.Tensor:
        return torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:n], device=a.device)

    windows = {name: list(ids_of(text, a.eval_tokens).split(a.window)) for name, text in texts.items()}
    calib = ids_of(data.read_texts(calib_files), a.calib_tokens)
    shipped = CALIBRATION_DIR / f"{base.name}.safetensors"  # the recipe the engine applies

    def row(name: str, model, baseline: dict | None = None) -> dict:
        r = {"config": name} | {f"ppl_{t}": perplexity(model, w) for t, w in windows.items()}
        if baseline is not None:
            r |= {f"vs_16bit_{t}": r[f"ppl_{t}"] / baseline[f"ppl_{t}"] - 1 for t in windows}
        print(r, flush=True)
        return r

    dtype = str(base.model.embed_tokens.weight.dtype).removeprefix("torch.")
    rows = [row(f"16-bit ({dtype})", base.model)]
    searched: dict[bool, dict] = {}  # per_layer_smoothing's result, by whether the model is rotated

    def per_layer_smoothing(model) -> dict:
        """quantize_model_w8a8's arguments for SmoothQuant with an alpha per layer chosen on ``calib`` (searched
        once per kind of model: every row loads the same weights)."""
        key = getattr(model, "rotation", None) is not None
        if key not in searched:
            stats = activation_absmax(model, calib)
            searched[key] = {"act_absmax": stats, "alpha": choose_alphas(model, calib, stats)}
        return searched[key]

    def keep(name: str, n: int):
        """Prepare a model as ``configs[name]`` does, and keep its ``n`` linears most sensitive once smoothed."""

        def prepare(model) -> dict:
            args = configs[name](model)
            probe = copy.deepcopy(model)
            if "act_absmax" in args:
                smooth_model(probe, args["act_absmax"], args["alpha"])
            return args | {"keep_16bit": most_sensitive(linear_sensitivity(probe, calib), n)}

        return prepare

    def rotated(then=None):
        def prepare(model) -> dict:
            rotate_model(model)
            return {} if then is None else then(model)

        return prepare

    # per row: prepares a fresh float model in place and returns quantize_model_w8a8's other arguments
    alphas = [float(x) for x in a.alphas.split(",") if x]
    configs = {"w8a8": lambda model: {}}
    for x in alphas:
        configs[f"w8a8+smoothquant(alpha={x})"] = lambda model, x=x: {"calibration_ids": calib, "alpha": x}
    configs["w8a8+smoothquant(per-layer alpha)"] = per_layer_smoothing
    configs["w8a8+rotation"] = rotated()
    for x in alphas:
        configs[f"w8a8+rotation+smoothquant(alpha={x})"] = rotated(
            lambda model, x=x: {"calibration_ids": calib, "alpha": x}
        )
    configs["w8a8+rotation+smoothquant(per-layer alpha)"] = rotated(per_layer_smoothing)
    for n in filter(None, a.keep_16bit.split(",")):
        for name in ("w8a8+smoothquant(per-layer alpha)", "w8a8+rotation"):
            configs[f"{name}+keep-16bit({n})"] = keep(name, int(n))
    skip = [w for w in a.skip.split(",") if w]
    configs = {name: prepare for name, prepare in configs.items() if not any(w in name for w in skip)}

    model = load_model(a.model, a.device).model
    rotate_model(model)
    rows.append(row(f"16-bit ({dtype}) rotated", model, rows[0]))
    for name, prepare in configs.items():
        model = load_model(a.model, a.device).model
        model = quantize_model_w8a8(model, **prepare(model))
        rows.append(row(name, model, rows[0]) | {"quantization": model.w8a8})
    if shipped.is_file() and not any(w in "w8a8+shipped recipe" for w in skip):
        model = quantize_with_recipe(load_model(a.model, a.device).model, shipped)
        rows.append(row("w8a8+shipped recipe", model, rows[0]) | {"quantization": model.w8a8})

    result = result_header("duo_qserve.eval.perplexity", argv, a.device) | {
        "model": base.name,
        "window": a.window,
        "calibration": {"files": [f.name for f in calib_files], "tokens": int(calib.numel())},
        "evaluation": {
            "essays": f"evaluation split of {data.essays_dir(a.essays)}",
            "pydocs": f"pydoc of {len(data.PYDOC_MODULES)} stdlib modules",
            "tokens": {t: sum(len(x) for x in w) for t, w in windows.items()},
        },
        "shipped_recipe": shipped.name if shipped.is_file() else None,
        "rows": rows,
    }
    path = write_json(a.out / f"perplexity-w8a8-{base.name}-{result['date']}.json", result)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
