"""W8A8 perplexity against 16-bit, on a few tokens of the default model: rows, texts and the result header."""

from __future__ import annotations

import json

import pytest
import torch

from duo_qserve import data
from duo_qserve.eval import perplexity


@pytest.mark.slow
def test_perplexity_compares_w8a8_with_16_bit_on_both_held_out_texts(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: more threads than free cores is many times slower
    try:
        argv = ["--model", "default", "--device", "cpu", "--calib-tokens", "64", "--eval-tokens", "128",
                "--window", "64", "--alphas", "0.5", "--keep-16bit", "2", "--skip", "per-layer",
                "--out", str(tmp_path)]  # fmt: skip
        assert perplexity.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    (out,) = tmp_path.glob("perplexity-w8a8-SmolLM2-135M-Instruct-*.json")
    res = json.loads(out.read_text())
    assert res["commit"] and res["command"].startswith("python -m duo_qserve.eval.perplexity --model default")
    assert res["calibration"]["files"] == [f.name for f in data.essay_files("calibration")]
    assert res["evaluation"]["tokens"] == {"essays": 128, "pydocs": 128}
    names = [r["config"] for r in res["rows"]]
    assert names == [
        "16-bit (float32)",
        "16-bit (float32) rotated",
        "w8a8",
        "w8a8+smoothquant(alpha=0.5)",
        "w8a8+rotation",
        "w8a8+rotation+smoothquant(alpha=0.5)",
        "w8a8+rotation+keep-16bit(2)",
        "w8a8+shipped recipe",
    ]
    assert abs(res["rows"][1]["vs_16bit_essays"]) < 1e-4  # the rotation keeps the float model's function
    for r in res["rows"]:
        assert 1 < r["ppl_essays"] < 1000 and 1 < r["ppl_pydocs"] < 1000
    assert all(abs(r["vs_16bit_pydocs"]) < 0.5 for r in res["rows"][1:])
