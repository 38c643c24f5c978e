"""Shared fixtures: paths to the read-only shared data, tiny random models, real text."""

from __future__ import annotations

import datetime
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from duo_qserve.environment import REPO_ROOT
from duo_qserve.model import ModelArgs, Transformer

if TYPE_CHECKING:
    from duo_qserve.cache import CacheSpec

SHARED = Path(os.environ.get("DUO_QSERVE_SHARED", REPO_ROOT.parent / "shared"))
HAYSTACK = SHARED / "data" / "haystack" / "paul_graham_essays"
UPSTREAM_PATTERNS = SHARED / "data" / "upstream_attn_patterns"
os.environ.setdefault("DUO_QSERVE_ESSAYS", str(HAYSTACK))  # the library reads essays only from a given place


def tiny_args(**overrides) -> ModelArgs:
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=96)
    base.update(overrides)
    return ModelArgs(**base)


def tiny_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """A random model whose attention is far from uniform (larger q/k weights), so masks visibly matter."""
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.q_proj.weight.mul_(4.0)
            block.self_attn.k_proj.weight.mul_(4.0)
    return model


def random_cache_pair(spec: CacheSpec, gen: torch.Generator, device: str = "cpu") -> tuple:
    """Two ``DuoKVCache`` whose layer 0 holds the same random codes, positive scales and fp values (no zeros
    anywhere): one for a reference to run on, one for the kernels."""
    # Imported here: duo_qserve.cache imports triton, which the interpreter tests must import first themselves.
    from duo_qserve.cache import DuoKVCache

    pair = DuoKVCache(spec, device), DuoKVCache(spec, device)
    for name, t in pair[0].layers[0].items():
        if t.dtype == torch.uint8:
            t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
        elif "scale" in name:
            t.copy_(torch.rand(t.shape, generator=gen) * 0.1 + 0.01)
        else:
            t.copy_(torch.randn(t.shape, generator=gen))
        pair[1].layers[0][name].copy_(t)
    return pair


def haystack_text(n_chars: int, start_file: int = 0) -> str:
    files = sorted(HAYSTACK.glob("*.txt"))
    if not files:
        pytest.skip(f"shared haystack not found at {HAYSTACK}")
    text = ""
    for f in files[start_file:] + files[:start_file]:
        text += f.read_text(errors="replace") + "\n\n"
        if len(text) >= n_chars:
            break
    return text[:n_chars]


_LOOP_PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def k(o_ptr, n):
    for i in range(tl.program_id(0), n):
        tl.store(o_ptr + i, i)
k[(1,)](torch.zeros(2, dtype=torch.int32), 2)
"""


@functools.cache
def _interpreter_problem(env: tuple) -> str | None:
    """None, or why this Triton's interpreter cannot run our kernels: Triton 3.6's turns a program id into a
    one-element array that numpy 2 refuses as a ``range`` bound (later versions take it)."""
    res = subprocess.run([sys.executable, "-c", _LOOP_PROBE], env=dict(env), capture_output=True, text=True)
    if res.returncode == 0:
        return None
    assert "only 0-dimensional arrays" in res.stderr, res.stderr[-2000:]  # any other failure is a real one
    return res.stderr.strip().splitlines()[-1]


def skip_if_interpreter_broken(env: dict) -> None:
    """Skip, with the reason, where a child process with ``env`` could not run our kernels in Triton's
    interpreter (``_interpreter_problem``)."""
    broken = _interpreter_problem(tuple(env.items()))
    if broken:
        import triton

        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run these kernels here ({broken})")


def run_in_interpreter_child(test_file: str) -> None:
    """Run a test module again in a fresh pytest process with Triton's interpreter on: Triton reads
    TRITON_INTERPRET when first imported, and an earlier module of this session may have imported it already."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "DUO_QSERVE_TRITON": "1"}
    skip_if_interpreter_broken(env)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


def on_ranks(world: int, target, *args) -> None:
    """Run ``target(group, *args)`` in ``world`` fresh CPU processes joined in a gloo ``ContextGroup`` (the
    environment torchrun would set, one thread each); raises if any rank fails. Collectives time out after 90 s,
    so a rank that takes another branch fails the run instead of hanging it. ``target`` must be importable (a
    module-level function)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the children as they start
    torch.multiprocessing.start_processes(
        _rank_entry, args=(world, port, target, args), nprocs=world, start_method="spawn"
    )


def _rank_entry(rank: int, world: int, port: int, target, args: tuple) -> None:
    import torch.distributed as dist

    from duo_qserve.distributed import ContextGroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
    group = ContextGroup.from_env("cpu")
    try:
        target(group, *args)
    finally:
        group.close()
