import json

import pytest
import torch
from conftest import UPSTREAM_PATTERNS

from duo_qserve.__main__ import main
from duo_qserve.cache import CacheConfig, CacheSpec
from duo_qserve.model import ModelArgs
from duo_qserve.patterns import load_pattern
from duo_qserve.planner import max_tokens_for_budget, parse_bytes, plan_for_tokens


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_bytes(512) == 512
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


def test_llama3_8b_kv4_bytes_per_token():
    """4-bit K and V (64 B each per head of 128 channels) + per-token value scale/zero (4 B) + per-channel key
    scale/zero amortized over 128-token groups (4 B): 136 B per retrieval head-layer per token."""
    args = ModelArgs.from_name("llama-3-8b")
    heads = [4] * 32  # 50% of 8 KV heads in each of 32 layers

    def quantized_bytes(n):
        c = CacheSpec(args, heads, CacheConfig(), n, torch.float16).bytes_by_component()
        return c["retrieval_kv"] + c["scales"]

    assert (quantized_bytes(256_000) - quantized_bytes(128_000)) / 128_000 == 128 * 136


def test_plan_is_monotone_and_budget_respected():
    args = ModelArgs.from_name("llama-3-8b")
    p = load_pattern(UPSTREAM_PATTERNS / "Llama-3-8B-Instruct-Gradient-4194k")
    heads = [int(m.sum()) for m in p.retrieval_mask(0.5)[0]]
    plan = max_tokens_for_budget(
        args, heads, CacheConfig(), parse_bytes("79.15GiB"), w8a8=True, chunk_size=16384
    )
    over = plan_for_tokens(args, heads, CacheConfig(), plan.tokens + 128, w8a8=True, chunk_size=16384)
    assert plan.total <= parse_bytes("79.15GiB") < over.total
    assert plan.tokens > 3_300_000  # the reference demo's 3.3M on an A100-80G


def test_plan_cli_json(capsys):
    pattern = UPSTREAM_PATTERNS / "Llama-3-8B-Instruct-Gradient-4194k"
    assert (
        main(["plan", "--model", "llama-3-8b", "--pattern", str(pattern), "--memory", "80GB", "--json"]) == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["max_tokens"] > 2_000_000 and out["sparsity"] == 0.5
    assert set(out["components"]) == {"weights", "retrieval_kv", "scales", "streaming_kv", "workspace"}
    assert sum(out["retrieval_heads_per_layer"]) == 128


def test_plan_over_ranks_fits_each_rank_and_multiplies_the_context(capsys):
    """Each rank's budget holds the weights, the streaming heads, its share of the retrieval tokens and a workspace
    that also gathers every rank's partial attention: over 3 ranks the context is nearly 3 times one GPU's (less
    what the gathers take), it is the largest that fits, and every rank's bytes fit its memory."""
    plans = {}
    for world in (1, 3):
        assert (
            main(["plan", "--model", "llama-3-8b", "--memory", "80GB", "--world-size", str(world), "--json"])
            == 0
        )
        plans[world] = json.loads(capsys.readouterr().out)
    one, three = plans[1], plans[3]
    assert three["world_size"] == 3 and three["total_bytes"] <= three["memory_bytes"]
    assert three["total_bytes_all_ranks"] == 3 * three["total_bytes"]
    assert three["max_tokens_per_rank"] <= one["max_tokens"] == one["max_tokens_per_rank"]
    assert 2.5 * one["max_tokens"] < three["max_tokens"] <= 3 * one["max_tokens"]
    assert three["components"]["weights"] == one["components"]["weights"]  # every rank holds the whole model
    assert three["components"]["workspace"] > one["components"]["workspace"]
    heads = three["retrieval_heads_per_layer"]
    config = CacheConfig(three["kv_bits"], three["key_group"], three["sink_tokens"], three["recent_tokens"])
    more = plan_for_tokens(ModelArgs.from_name("llama-3-8b"), heads, config, three["max_tokens"] + 1, w8a8=True,
                           chunk_size=three["chunk_size"], world_size=3)  # fmt: skip
    assert more.total > three["memory_bytes"]
