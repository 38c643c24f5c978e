"""The context-parallel benchmark runs under torchrun on the CPU (gloo) with a small synthetic model: at world size
1 it times the plain and the context-parallel engine side by side, at world size 2 it reports each rank's share."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from duo_qserve.environment import REPO_ROOT

pytestmark = pytest.mark.slow
MAX_TOKENS = 1536


def bench(world: int, out) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
        "-m", "duo_qserve.bench.context_parallel", "--model", "synthetic:smollm2-135m", "--cpu", "--no-w8a8",
        "--context", "200", "--steps", "3", "--max-tokens", str(MAX_TOKENS), "--chunk-size", "64",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    res = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    (path,) = out.glob(f"context-parallel-{world}x-cpu-*.json")
    return json.loads(path.read_text())


def test_world_size_1_times_both_engines_on_the_same_device(tmp_path):
    result = bench(1, tmp_path)
    assert result["launch"] == "torchrun --nproc-per-node 1" and result["commit"]
    plain, cp = result["rows"]
    assert (plain["engine"], cp["engine"]) == ("plain", "context-parallel")
    for row in (plain, cp):
        assert row["prefill_tok_per_s"] > 0 and row["decode_ms_per_token"] > 0
        assert row["world_size"] == 1 and row["capacity_tokens_per_rank"] == MAX_TOKENS
    assert plain["cache_bytes_total"] == cp["cache_bytes_total"]  # one rank holds it all either way


def test_world_size_2_reports_each_ranks_share(tmp_path):
    (row,) = bench(2, tmp_path)["rows"]
    assert row["engine"] == "context-parallel" and row["world_size"] == 2
    assert row["capacity_tokens"] == MAX_TOKENS and row["capacity_tokens_per_rank"] == MAX_TOKENS // 2
    assert row["cache_bytes_total"] == 2 * row["cache_bytes_per_rank"]
