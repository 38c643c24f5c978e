"""The context-parallel decode step as a CUDA graph that captures the merge's NCCL all-gather, on one GPU.

A one-rank NCCL group, made in this process (no torchrun): the graphed step over a ``ShardedKVCache`` against the
eager sharded step and against the plain engine's graph over a ``DuoKVCache``, and the engine replaying it. Needs
CUDA, NCCL and a Triton that compiles. The CPU tests (``test_distributed``) hold the same step, run without a
graph, to the eager one on 2 and 3 gloo ranks.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_args, tiny_model

from duo_qserve import kernels
from duo_qserve.cache import CacheConfig, DuoKVCache
from duo_qserve.decode_graph import GraphedDecoder
from duo_qserve.distributed import ContextGroup, ShardedKVCache, TokenShards
from duo_qserve.engine import Engine, EngineSettings
from duo_qserve.loading import LoadedModel
from duo_qserve.patterns import random_pattern, save_pattern

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or kernels.INTERPRETED or not dist.is_nccl_available(),
    reason="needs a CUDA GPU, NCCL and Triton compiling, not interpreting",
)
ARGS = tiny_args(n_layers=3, n_heads=8, n_kv_heads=4, head_dim=64)  # 64 channels: the code kernel's fewest
RETRIEVAL = [1, 3, 2]  # of 4 KV heads per layer: mixed, as a 50% pattern
CONFIG = CacheConfig(kv_bits=4, key_group=16, sink_tokens=8, recent_tokens=32)
PROMPT, STEPS = 45, 70  # the ring is full from the start; the steps cross 4 key-group boundaries
# Both steps run in float32 (exact fp32 products in every kernel) from the same cache state at every step, so no
# 4-bit code can come out differently and carry over; they differ in summation order (the fused step against
# dense attention + the code kernel + a merge) and in whether RoPE contracts to FMAs (the new key by an fp32 ulp).
# The same comparison on the CPU measures 1.3e-6 on logits of size ~2; 1e-4 is 75x that and 500x below the new
# token counted twice (5e-2).
LOGITS_ATOL = 1e-4
# Decoding on from its own state, a path may quantize a key at a 4-bit code boundary differently from the other and
# carry it over: as ``test_distributed.GRAPH_LOGITS_ATOL`` (2.3e-4 seen on the CPU), 1e-3.
CARRIED_ATOL = 1e-3


@pytest.fixture(scope="module")
def group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as m:
        for name, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                                LOCAL_RANK="0").items():  # fmt: skip
            m.setenv(name, value)
        group = ContextGroup.from_env("cuda")
        try:
            assert group.in_cuda_graphs
            yield group
        finally:
            group.close()


def _copy(src: DuoKVCache, dst: DuoKVCache) -> None:
    """dst := src in place (a captured graph keeps reading dst's tensors)."""
    for a, b in zip(src.layers, dst.layers, strict=True):
        for name, t in a.items():
            b[name].copy_(t)
    dst.seq_len = src.seq_len


@torch.inference_mode()
def test_graphed_sharded_decode_equals_eager_and_the_plain_graph(group):
    """Every step from the eager sharded cache's state: the graphed sharded step within LOGITS_ATOL of the eager
    one, and bit for bit the plain engine's graph (at one rank the merge weighs the only partial by exp(0) = 1)."""
    device = group.device
    model = tiny_model(ARGS).to(device)
    spec = TokenShards(1, CONFIG.key_group).rank_spec(ARGS, RETRIEVAL, CONFIG, 256, torch.float32)
    eager, graphed = ShardedKVCache(spec, device, group), ShardedKVCache(spec, device, group)
    plain = DuoKVCache(spec, device)
    ids = torch.randint(ARGS.vocab_size, (PROMPT + STEPS,), generator=torch.Generator().manual_seed(0))
    model(ids[:PROMPT].to(device), eager)
    sharded_step, plain_step = GraphedDecoder(model, graphed), GraphedDecoder(model, plain)
    worst = 0.0
    for i in range(PROMPT, PROMPT + STEPS):
        _copy(eager, graphed)
        _copy(eager, plain)
        want = model(ids[i : i + 1].to(device), eager, last_only=True)
        got = sharded_step.step(int(ids[i])).clone()
        mirror = plain_step.step(int(ids[i]))
        worst = max(worst, (got - want).abs().max().item())
        assert torch.equal(got, mirror), (i, (got - mirror).abs().max().item())
    assert worst <= LOGITS_ATOL, f"the graphed sharded step is {worst:.2e} from the eager one"
    assert sharded_step.replays == STEPS - 1 and plain_step.replays == STEPS - 1  # captured at the first step


@torch.inference_mode()
def test_the_engine_replays_the_sharded_graph(group, tmp_path):
    """``Engine(..., group=...)`` on NCCL, a mixed 50% pattern, decodes through the graph (its all-gather
    captured) and gives the logits of the same engine decoding eagerly (``decode_graph`` off), within CARRIED_ATOL
    over 40 steps."""
    loaded = LoadedModel(tiny_model(ARGS).to(group.device), None, "tiny", "tiny")
    save_pattern(tmp_path, random_pattern(ARGS, seed=0).gates, {"sink_size": 8, "recent_size": 32})
    # one pre-fill chunk: a float32 pre-fill over a quantized prefix would need SDPA in float32
    settings = EngineSettings(pattern=str(tmp_path), sparsity=0.5, kv_bits=4, key_group=16, sink=8, recent=32, chunk_size=128,
                              max_tokens=2048, w8a8=False)  # fmt: skip
    engine = Engine(loaded, settings, group)
    assert engine.decode_graph and 0 < sum(engine.retrieval_heads) < ARGS.n_layers * ARGS.n_kv_heads
    ids = torch.randint(ARGS.vocab_size, (160,), generator=torch.Generator().manual_seed(1)).tolist()
    engine.ingest(ids[:120])
    runs, replays = [], []
    for graph in (True, False):
        engine.decode_graph = graph
        engine.cache.restore()
        replays.append(engine._decoder.replays if engine._decoder else 0)
        runs.append(torch.cat([engine._decode_step(token).clone() for token in ids[120:]]))
    assert replays[1] - replays[0] >= 39  # every step but a capture replayed the graph
    diff = (runs[0] - runs[1]).abs().max().item()
    assert diff <= CARRIED_ATOL, f"graphed and eager decode differ by {diff:.2e}"
