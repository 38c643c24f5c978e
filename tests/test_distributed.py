"""Context parallelism (``duo_qserve.distributed``): the ownership arithmetic, and engines on 2 and 3 gloo ranks
that must give the single-process engine's logits and answers on the same document.

Each world size is one spawn of CPU processes (``conftest.on_ranks``) that runs every scenario below in order (the
engine's calls are SPMD, so every rank runs the same ones) and saves its results; the tests compare them with the
same scenario run here in one process.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAYSTACK, haystack_text, on_ranks, tiny_args, tiny_model

from duo_qserve.cache import CacheConfig
from duo_qserve.decode_graph import GraphedDecoder
from duo_qserve.distributed import ContextGroup, TokenShards, quiet_interrupt
from duo_qserve.engine import Cancelled, Engine, EngineSettings
from duo_qserve.environment import REPO_ROOT
from duo_qserve.kernels.attention import dense_attention
from duo_qserve.loading import LoadedModel
from duo_qserve.model import ModelArgs
from duo_qserve.patterns import random_pattern, save_pattern

ARGS = tiny_args(n_layers=3, n_heads=8, n_kv_heads=4)  # seed 0 at 50%: 1, 3 and 2 retrieval heads of 4
BLOCK = 16  # the tiny engines' key group, so the ownership block
DOC = [(i * 37 + 11) % ARGS.vocab_size for i in range(203)]  # 12 whole blocks and 11 tokens; 5 chunks
FOLLOW = [(i * 13 + 5) % ARGS.vocab_size for i in range(20)]  # a follow-up across a block boundary
STEPS = 24  # greedy decode steps after it, across two more
QUESTION = "What is this text about?"
ANSWER_TOKENS = 16
# The tiny engines compute in float32 and store the same KV codes on any number of ranks; a context-parallel
# forward differs from the single-process one only in how each layer's softmax is split into partials before the
# log-sum-exp merge. A score is rounded at float32 spacing relative to its size (up to |30| here, the model's q/k
# weights are scaled up: ~2e-6), so attention weights move by ~2e-6 relative, and three sharp layers amplify that:
# measured at most 1.2e-6 (KV16) and 8.2e-5 (KV4) on logits of size ~2. 2e-4 leaves 2.5x; a token attended or
# stored in the wrong place moves logits by more than 1e-1.
LOGITS_ATOL = 2e-4
# The graph-safe decode step (``decode_graph``, run without a graph: its torch reference on the CPU) for as many
# steps as cross 7 key-group boundaries, at least 2 on every rank of 3, each one a tail commit on its owner only;
# on heads of 64 channels, the fewest the step takes (``kv_attention.code_kernel_fits``).
GRAPH_ARGS = tiny_args(n_layers=3, n_heads=8, n_kv_heads=4, head_dim=64)
GRAPH_STEP_IDS = [(i * 29 + 3) % ARGS.vocab_size for i in range(7 * BLOCK)]
# The graph-safe step stores the same k/v as the eager one and sums its softmax in another order: measured at most
# 1.3e-6 on logits of size ~2 against the eager sharded step and 1.1e-6 against one process (2 ranks). But a key a
# rounding error from a 4-bit code boundary quantizes differently in one path only and moves later logits by more:
# seen at 3 ranks from the 4th step on, 2.3e-4 between the eager sharded step and one process. 1e-3 leaves 4x
# over that; the new token attended on every rank instead of its owner alone moves logits by 5e-2.
GRAPH_LOGITS_ATOL = 1e-3


# ---- ownership arithmetic ------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("block", [1, 16, 128])
def test_held_tokens_count_the_positions_each_rank_owns(world, block):
    shards = TokenShards(world, block)
    for seq_len in [*range(0, 3 * world * block + 2), 10 * world * block + block // 2]:
        owners = [shards.owner(p) for p in range(seq_len)]
        held = [shards.held(seq_len, r) for r in range(world)]
        assert held == [owners.count(r) for r in range(world)]
        assert max(held) - min(held) <= block and held[0] == max(held)  # even fill; rank 0 the fullest


def test_owned_runs_are_the_new_tokens_a_rank_owns_in_order():
    shards = TokenShards(3, 16)
    for start in (0, 5, 16, 47, 48, 100):
        for count in (0, 1, 15, 16, 17, 64, 203):
            for rank in range(3):
                runs = shards.owned_runs(start, count, rank)
                offsets = [i for a, b in runs for i in range(a, b)]
                assert offsets == [i for i in range(count) if shards.owner(start + i) == rank]
                assert all(b > a for a, b in runs)


def test_a_rank_allocates_its_share_of_the_retrieval_tokens():
    c, heads, n = CacheConfig(), [2, 1, 3], 1_000_000
    shards = TokenShards(3, c.key_group)
    one = TokenShards(1, c.key_group).rank_spec(ARGS, heads, c, n, torch.float16)
    share = shards.rank_spec(ARGS, heads, c, n, torch.float16)
    assert share.max_tokens == n and shards.held(n, 0) <= share.capacity < n / 3 + c.key_group
    single, mine = one.bytes_by_component(), share.bytes_by_component()
    assert mine["streaming_kv"] == single["streaming_kv"]  # replicated
    # every rank keeps its own fp tail (one key group per head); the rest is a third
    for part in ("retrieval_kv", "scales"):
        assert single[part] <= 3 * mine[part] <= 1.002 * single[part]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_held_on_the_device_is_held(world):
    shards = TokenShards(world, 16)
    lengths = torch.arange(0, 10 * world * 16 + 3)
    for rank in range(world):
        want = [shards.held(int(n), rank) for n in lengths]
        assert shards.held_at(lengths, rank).tolist() == want


@pytest.mark.parametrize("launched", [False, True])
def test_a_ctrl_c_ends_with_one_line(launched, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2" if launched else "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as end, quiet_interrupt():
        raise KeyboardInterrupt
    assert end.value.code == 130
    assert capsys.readouterr().err == ("interrupted (rank 1)\n" if launched else "interrupted\n")


# ---- the scenarios every rank runs, and one process runs for the reference ----------------------------------
def tiny_engine(group: ContextGroup | None, pattern: Path, kv_bits: int, args: ModelArgs = ARGS) -> Engine:
    loaded = LoadedModel(tiny_model(args), None, "tiny", "tiny")
    settings = EngineSettings(
        pattern=str(pattern), sparsity=0.5, kv_bits=kv_bits, key_group=BLOCK, sink=8, recent=32,
        chunk_size=48, max_tokens=2048, w8a8=False,
    )  # fmt: skip
    return Engine(loaded, settings, group)


def tiny_logits(group: ContextGroup | None, work: Path, kv_bits: int) -> dict:
    """Every logit of a follow-up after the document, then of greedy decode steps, and the stats."""
    engine = tiny_engine(group, work / "pattern", kv_bits)
    with torch.inference_mode():
        engine.ingest(DOC)
        engine.cache.restore()
        logits = [engine.model(torch.tensor(FOLLOW), engine.cache)]
        tokens = []
        for _ in range(STEPS):
            tokens.append(int(logits[-1][-1].argmax()))
            logits.append(engine._decode_step(tokens[-1]))
    return {"logits": torch.cat(logits), "tokens": tokens, "ranks": engine.stats()["ranks"],
            "retrieval_len": engine.cache.retrieval_len}  # fmt: skip


def tiny_graph_safe(group: ContextGroup | None, work: Path) -> dict:
    """KV4, the mixed pattern: after the document and the follow-up, ``GRAPH_STEP_IDS`` through the graph-safe
    step, then again from the checkpoint through the eager step; the logits of both and the layers' retrieval
    tensors after each (this rank's share)."""
    engine = tiny_engine(group, work / "pattern", 4, GRAPH_ARGS)
    out = {}
    with torch.inference_mode():
        engine.ingest(DOC)
        for name in ("graph_safe", "eager"):
            engine.cache.restore()
            logits = [engine.model(torch.tensor(FOLLOW), engine.cache)[-1:]]
            decoder = GraphedDecoder(engine.model, engine.cache, use_graph=False)
            for token in GRAPH_STEP_IDS:
                if name == "graph_safe":
                    assert decoder.supported()
                    logits.append(decoder.step(token).clone())
                else:
                    logits.append(engine.model(torch.tensor([token]), engine.cache, last_only=True))
            out[name] = torch.cat(logits)
            out[f"{name}_cache"] = [{n: t.clone() for n, t in layer.items()} for layer in engine.cache.layers]
        out["retrieval_len"] = engine.cache.retrieval_len
    return out


def tiny_cancel(group: ContextGroup | None, work: Path) -> str:
    """Rank 0 cancels before the pre-fill: every rank must stop at the same chunk."""
    engine = tiny_engine(group, work / "pattern", 16)
    if group is None or group.is_leader:
        engine.cancel()
    try:
        engine.ingest(DOC)
    except Cancelled as e:
        return str(e)
    return "not cancelled"


def tiny_warm_up(group: ContextGroup | None, work: Path) -> list[float]:
    """What the app does at load: the warm-up, then the time-left clock's probe of a chunk's cost at a few
    prefixes, which a rank must time on its own share of them."""
    engine = tiny_engine(group, work / "pattern", 4)
    engine.warm_up()
    return engine.chunk_seconds([0, 512, 1500])


def merge_with_an_empty_rank(group: ContextGroup, work: Path) -> dict:
    """Each rank attends over its slice of 40 keys (the last rank over none) and the merge must give attention
    over all of them."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(5, 4, 8, generator=gen),
        torch.randn(2, 40, 8, generator=gen),
        torch.randn(2, 40, 8, generator=gen),
    )
    bounds = [round(40 * r / (group.world_size - 1)) for r in range(group.world_size)] + [40]
    a, b = bounds[group.rank], bounds[group.rank + 1]
    out, lse = dense_attention(q, k[:, a:b], v[:, a:b], n_ctx=b - a, sm_scale=0.3)
    return {"merged": group.merge(out, lse), "reference": dense_attention(q, k, v, n_ctx=40, sm_scale=0.3)[0]}


def smollm2_answer(group: ContextGroup | None, work: Path) -> dict:
    """The default model's greedy answer about real text; an answer that rank 0 cancels after a piece; one whose
    stream rank 0 closes after a piece (the others read theirs to the end); then the first question again."""
    settings = EngineSettings(max_tokens=2048, chunk_size=256, device="cpu", w8a8=False)
    engine = Engine.from_settings(settings, group)
    engine.ingest((work / "essay.txt").read_text())
    answer = engine.answer(QUESTION, max_new_tokens=ANSWER_TOKENS, temperature=0.0)
    pieces = engine.ask("Summarize the text.", max_new_tokens=ANSWER_TOKENS)
    next(pieces)
    if group is None or group.is_leader:
        engine.cancel()
    rest = list(pieces)
    cancelled = engine.last.ended_by
    pieces = engine.ask("Summarize the text.", max_new_tokens=ANSWER_TOKENS)
    next(pieces)
    if group is None or group.is_leader:
        pieces.close()
    else:
        list(pieces)
    again = engine.answer(QUESTION, max_new_tokens=ANSWER_TOKENS, temperature=0.0)
    return {"answer": answer, "cancelled": cancelled, "after_cancel": len(rest), "again": again}


SCENARIOS = {
    "kv16": lambda g, w: tiny_logits(g, w, 16),
    "kv4": lambda g, w: tiny_logits(g, w, 4),
    "graph_safe": tiny_graph_safe,
    "cancel": tiny_cancel,
    "merge": merge_with_an_empty_rank,
    "smollm2": smollm2_answer,
    "warm": tiny_warm_up,
}


def _run_scenarios(group: ContextGroup, work: str, out: str, scenarios: list[str]) -> None:
    results = {name: SCENARIOS[name](group, Path(work)) for name in scenarios}
    torch.save(results, Path(out) / f"rank{group.rank}.pt")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cp")
    save_pattern(work / "pattern", random_pattern(ARGS, seed=0).gates, {"sink_size": 8, "recent_size": 32})
    if HAYSTACK.is_dir():
        (work / "essay.txt").write_text(haystack_text(2500))
    return work


@pytest.fixture(scope="module")
def single(work) -> dict:
    return {name: f(None, work) for name, f in SCENARIOS.items() if name != "merge" and _runs(name, work)}


def _runs(name: str, work: Path) -> bool:
    return name != "smollm2" or (work / "essay.txt").is_file()


def _spawn(world: int, work: Path, names: list[str]) -> list[dict]:
    out = work / f"world{world}"
    out.mkdir()
    on_ranks(world, _run_scenarios, str(work), str(out), [n for n in names if _runs(n, work)])
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def world2(work) -> list[dict]:
    return _spawn(2, work, list(SCENARIOS))


@pytest.fixture(scope="module")
def world3(work) -> list[dict]:
    return _spawn(3, work, ["kv16", "kv4", "graph_safe", "cancel", "merge"])


@pytest.fixture(params=[2, 3])
def ranks(request) -> list[dict]:
    return request.getfixturevalue(f"world{request.param}")


# ---- engines on several ranks against one process -------------------------------------------------------------
@pytest.mark.parametrize("kv", ["kv16", "kv4"])
def test_context_parallel_logits_equal_one_process(ranks, single, kv):
    ref = single[kv]
    for r in ranks:
        diff = (r[kv]["logits"] - ref["logits"]).abs().max().item()
        assert diff <= LOGITS_ATOL, f"logits differ by {diff:.2e} (allowed {LOGITS_ATOL:.0e})"
        assert r[kv]["tokens"] == ref["tokens"]
    assert all(torch.equal(r[kv]["logits"], ranks[0][kv]["logits"]) for r in ranks)  # merged in rank order


@pytest.mark.parametrize("kv", ["kv16", "kv4"])
def test_ranks_hold_even_shares_and_report_them(ranks, single, kv):
    world, seq_len = len(ranks), len(DOC) + len(FOLLOW) + STEPS
    held = [r[kv]["retrieval_len"] for r in ranks]
    assert sum(held) == seq_len and max(held) - min(held) <= BLOCK
    one = single[kv]["ranks"]
    for rank, r in enumerate(ranks):
        stats = r[kv]["ranks"]
        assert (stats["world_size"], stats["rank"], stats["held_tokens_per_rank"]) == (world, rank, held)
        assert stats["capacity_tokens"] == one["capacity_tokens"]
        assert stats["memory_total"]["streaming_kv"] == world * one["memory_total"]["streaming_kv"]
        extra = stats["memory_total"]["retrieval_kv"] - one["memory_total"]["retrieval_kv"]
        assert 0 <= extra < one["memory_total"]["retrieval_kv"] / world  # each rank about 1/world of it


def test_a_cancel_on_rank_0_stops_every_rank_at_the_same_chunk(ranks, single):
    assert "stopped after 0 of" in single["cancel"]
    assert [r["cancel"] for r in ranks] == [single["cancel"]] * len(ranks)


def test_every_rank_warms_up_and_probes_a_chunk_as_the_app_does(world2, single):
    assert all(t > 0 and math.isfinite(t) for t in single["warm"])
    for r in world2:
        assert len(r["warm"]) == 3 and all(t > 0 and math.isfinite(t) for t in r["warm"])


def test_graph_safe_decode_equals_the_eager_step_and_one_process(ranks, single):
    """The graph-safe step on every rank against the eager sharded step on that rank and the one-process engine,
    across tail commits on every rank; each rank stored what the eager step stores."""
    world, start = len(ranks), len(DOC) + len(FOLLOW)
    shards = TokenShards(world, BLOCK)
    for rank in range(world):  # the scenario reaches what it is for: at least two commits on every rank
        end = start + len(GRAPH_STEP_IDS)
        assert shards.held(end, rank) // BLOCK - shards.held(start, rank) // BLOCK >= 2
    one = single["graph_safe"]["eager"]
    for r in ranks:
        got = r["graph_safe"]
        for name, want in (("eager sharded", got["eager"]), ("one-process", one)):
            diff = (got["graph_safe"] - want).abs().max().item()
            assert diff <= GRAPH_LOGITS_ATOL, (
                f"{diff:.2e} from the {name} step (allowed {GRAPH_LOGITS_ATOL:.0e})"
            )
        # layer 0's k/v come from the embeddings alone, the same in both steps: its codes, scales and fp tail
        # hold the same bits over the rank's share
        held = got["retrieval_len"]
        for name, t in got["eager_cache"][0].items():
            n = {"k_scale": held // BLOCK, "k_zero": held // BLOCK, "k_tail": held % BLOCK,
                 "v_tail": held % BLOCK}.get(name, held // BLOCK * BLOCK)  # fmt: skip
            if not name.startswith(("sink", "ring")):
                assert torch.equal(got["graph_safe_cache"][0][name][:, :n], t[:, :n]), name
    assert all(
        torch.equal(r["graph_safe"]["graph_safe"], ranks[0]["graph_safe"]["graph_safe"]) for r in ranks
    )


def test_merge_over_ranks_with_an_empty_one_is_attention_over_all_keys(ranks):
    for r in ranks:
        torch.testing.assert_close(r["merge"]["merged"], r["merge"]["reference"], atol=1e-6, rtol=1e-5)
        assert torch.equal(r["merge"]["merged"], ranks[0]["merge"]["merged"])


@pytest.mark.slow
def test_default_model_answers_as_in_one_process(world2, single):
    if "smollm2" not in single:
        pytest.skip(f"shared haystack not found at {HAYSTACK}")
    ref = single["smollm2"]
    assert ref["answer"].strip()
    for r in world2:
        assert r["smollm2"]["answer"] == ref["answer"]
        assert r["smollm2"]["cancelled"] == "cancel" and r["smollm2"]["again"] == ref["answer"]
        assert r["smollm2"]["after_cancel"] == world2[0]["smollm2"]["after_cancel"] <= 1


@pytest.mark.slow
def test_torchrun_ask_prints_the_one_process_answer_once(work, single):
    """``torchrun --nproc-per-node 2 -m duo_qserve ask``: both ranks answer, rank 0 alone prints."""
    if "smollm2" not in single:
        pytest.skip(f"shared haystack not found at {HAYSTACK}")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "duo_qserve",
        "ask", QUESTION, "--doc", str(work / "essay.txt"), "--cpu", "--no-w8a8", "--max-tokens", "2048",
        "--chunk-size", "256", "--max-new-tokens", str(ANSWER_TOKENS),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    res = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == single["smollm2"]["answer"] + "\n"
