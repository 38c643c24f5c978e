"""Perplexity of the default model on held-out essays: float vs W8A8 vs W8A8 + SmoothQuant at several alphas.

Calibration text and evaluation text come from disjoint essays of the shared haystack. Each evaluation window is
scored independently (no context carried between windows), with every token after the first predicted.

    python -m duo_qserve.eval.perplexity --out benchmarks/results [--alphas 0.3,0.5,0.7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from duo_qserve.cache import FullKVCache
from duo_qserve.loading import REPO_ROOT, load_model
from duo_qserve.quant.w8a8 import quantize_model_w8a8

HAYSTACK = REPO_ROOT.parent / "shared" / "data" / "haystack" / "paul_graham_essays"


@torch.inference_mode()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = model(ids, FullKVCache(model.args, len(ids), ids.device, model.embed_tokens.weight.dtype))
        nll += torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def split_text(haystack: Path, calib_files: int) -> tuple[str, str]:
    files = sorted(haystack.glob("*.txt"))
    if len(files) <= calib_files:
        raise SystemExit(f"need more than {calib_files} essays in {haystack}")
    read = lambda fs: "\n\n".join(f.read_text(errors="replace") for f in fs)  # noqa: E731
    return read(files[:calib_files]), read(files[calib_files:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--haystack", type=Path, default=HAYSTACK)
    p.add_argument(
        "--calib-files", type=int, default=8, help="the first N essays calibrate; the rest evaluate"
    )
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--alphas", default="0.3,0.5,0.7,0.85")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    a = p.parse_args(argv)

    calib_text, eval_text = split_text(a.haystack, a.calib_files)
    base = load_model(a.model)
    tok = base.tokenizer
    ids = torch.tensor(tok(eval_text, add_special_tokens=False)["input_ids"][: a.eval_tokens])
    windows = list(ids.split(a.window))
    calib = torch.tensor(tok(calib_text, add_special_tokens=False)["input_ids"][: a.calib_tokens])

    rows = [{"config": "fp32", "ppl": perplexity(base.model, windows)}]
    print(rows[-1], flush=True)
    configs = [("w8a8", None)] + [(f"w8a8+smoothquant(alpha={x})", float(x)) for x in a.alphas.split(",")]
    for name, alpha in configs:
        model = load_model(a.model).model
        quantize_model_w8a8(model, calib if alpha is not None else None, alpha if alpha is not None else 0.5)
        rows.append({"config": name, "ppl": perplexity(model, windows)})
        rows[-1]["vs_fp32"] = rows[-1]["ppl"] / rows[0]["ppl"] - 1
        print(rows[-1], flush=True)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "device": "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": commit or "unknown",
        "command": " ".join(
            ["python -m duo_qserve.eval.perplexity", *(argv if argv is not None else sys.argv[1:])]
        ),
        "model": base.name,
        "eval_tokens": int(ids.numel()),
        "window": a.window,
        "calibration": f"first {a.calib_files} essays, {calib.numel()} tokens",
        "evaluation": "the remaining essays",
        "rows": rows,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"perplexity-w8a8-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
