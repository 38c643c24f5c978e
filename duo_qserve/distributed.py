"""Context parallelism: one document's retrieval cache split by tokens over the ranks of a torch.distributed group.

Every rank holds the whole model, the streaming heads' sinks and ring (a few MB, replicated) and its share of the
retrieval heads' tokens. Every rank runs the same forward on the same tokens (SPMD): the weights, the streaming
heads and the new tokens' q, k, v are the same everywhere, so the only thing a layer must exchange is attention
over the tokens a rank holds and the others do not.

Ownership (``TokenShards``): global position ``p`` belongs to rank ``(p // block) % world_size``, round-robin by
fixed blocks. ``block`` is the cache's key group, so a rank's own tokens, read in position order, are made of the
very key groups the single-process cache quantizes: KV4 codes and scales are the same, and results differ from one
process only by the rounding of the merge. Ranks never differ by more than one block, and how many tokens a rank
holds is a pure function of the global length (no state besides ``seq_len``), so checkpoint and restore stay as
they are.

Attention (``ShardedKVCache``): for the retrieval heads of each layer every rank computes the partial attention of
the new queries over the tokens it holds (all earlier than the new ones, so no mask), rank 0 adds the new tokens'
own causal attention, and ``ContextGroup.merge`` gathers every rank's (out, lse) in one collective and combines
them by log-sum-exp: one all-gather per layer, at pre-fill and at decode alike. Then each rank stores the new
tokens it owns. Rank 0 samples each answer token and says whether the job was cancelled
(``ContextGroup.from_leader``), so every rank takes the same branches.

Decode (``duo_qserve.decode_graph``, a CUDA graph on NCCL): the graph-safe step derives this rank's held count from
the global position on the device (``TokenShards.held_at``), so its fp-tail length and quantized length follow the
rank's own share; the new token's owner attends it and writes it into its tail, the other ranks attend their own
tokens only (``decode_step.StepSlots.keep``), and ``ShardedKVCache.step_output`` merges the retrieval heads over
the ranks (the all-gather is captured in the graph); streaming heads, replicated, are not merged. Between replays a
rank quantizes its tail when its own held count fills a key group.

NCCL on GPUs (one process per GPU, ``torchrun --nproc-per-node N``), gloo on CPUs.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from duo_qserve.cache import CacheConfig, CacheSpec, DuoKVCache
from duo_qserve.kernels import kv_attention
from duo_qserve.kernels.attention import dense_attention, merge
from duo_qserve.kernels.kv_attention import PrefixAttention
from duo_qserve.model import ModelArgs

# a rank that stops answering (crashed, took another branch) fails the others after this long
TIMEOUT = datetime.timedelta(minutes=10)
IDLE = datetime.timedelta(days=365)  # how long a rank may wait for rank 0's next order (``share``)


@dataclass(frozen=True)
class TokenShards:
    """Which rank holds which global position: blocks of ``block`` positions dealt round-robin over
    ``world_size`` ranks. At world size 1 rank 0 holds everything."""

    world_size: int
    block: int

    def __post_init__(self):
        if self.world_size < 1 or self.block < 1:
            raise ValueError(f"need world_size >= 1 and block >= 1, got {self.world_size} and {self.block}")

    def owner(self, position: int) -> int:
        return position // self.block % self.world_size

    def held(self, seq_len: int, rank: int) -> int:
        """Tokens among the first ``seq_len`` positions that ``rank`` holds. Rank 0 is never behind another."""
        # each whole round of ``world_size`` blocks gave every rank one; the rest fills ranks 0, 1, ... in turn
        rounds, rest = divmod(seq_len, self.world_size * self.block)
        return rounds * self.block + min(max(rest - rank * self.block, 0), self.block)

    def held_at(self, seq_len: torch.Tensor, rank: int) -> torch.Tensor:
        """``held`` of an int64 device tensor, on the device (no host sync): the decode graph's lengths."""
        span = self.world_size * self.block
        return seq_len // span * self.block + (seq_len % span - rank * self.block).clamp(0, self.block)

    def owned_runs(self, start: int, count: int, rank: int) -> list[tuple[int, int]]:
        """The offsets ``[a, b)`` into positions ``start .. start + count`` that ``rank`` owns, in order: where a
        forward's new tokens go on that rank."""
        end = start + count
        first = start // self.block
        first += (rank - first) % self.world_size  # the first block from ``start`` on that is ``rank``'s
        blocks = range(first, math.ceil(end / self.block), self.world_size) if count else ()
        return [(max(b * self.block, start) - start, min((b + 1) * self.block, end) - start) for b in blocks]

    def rank_spec(
        self,
        args: ModelArgs,
        retrieval_heads: list[int],
        config: CacheConfig,
        max_tokens: int,
        dtype: torch.dtype,
    ) -> CacheSpec:
        """What one rank allocates for ``max_tokens`` global tokens: retrieval slots for the largest share (rank
        0's), every streaming tensor whole. Every rank allocates the same shapes, so totals are world_size times
        this."""
        return CacheSpec(
            args, retrieval_heads, config, max_tokens, dtype, retrieval_tokens=self.held(max_tokens, 0)
        )


class ContextGroup:
    """The ranks that share one document's context, over a torch.distributed process group.

    Every collective here is called by every rank in the same order: the engine's jobs are SPMD (each rank runs
    the same calls on the same inputs), and ``from_leader`` makes the few host decisions (the sampled token, a
    cancel) rank 0's. It is the default process group (every rank torchrun started), which must be initialised;
    ``device`` is where collective tensors live: the rank's GPU for NCCL, the CPU for gloo."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._orders: dist.ProcessGroup | None = None  # made by the first ``share``

    @staticmethod
    def launched() -> bool:
        """Whether this process is one of several that torchrun started (``WORLD_SIZE`` > 1)."""
        return int(os.environ.get("WORLD_SIZE", "1")) > 1

    @classmethod
    def from_env(cls, device: str | None = None) -> ContextGroup:
        """Join the group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). ``device``: "cuda"
        (one GPU per process, LOCAL_RANK's: NCCL) or "cpu" (gloo); None: CUDA if there is one."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "context parallelism needs the ranks that torchrun sets up: start with "
                "torchrun --nproc-per-node N -m duo_qserve ..."
            )
        cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
            torch.cuda.set_device(local)
            where = torch.device("cuda", local)
        else:
            where = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        return cls(where)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def in_cuda_graphs(self) -> bool:
        """Whether a CUDA graph can capture this group's collectives: NCCL's it can, gloo's (CPU) it cannot."""
        return dist.get_backend() == "nccl"

    def merge(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """The attention over every rank's keys from this rank's partial ``out`` [T, H, D] and ``lse`` [T, H]
        (natural log; -inf where the rank held nothing): one all-gather of both packed in one float32 tensor, then
        a log-sum-exp merge over the ranks in rank order, so every rank gets bitwise the same result. Returns
        [T, H, D] in ``out``'s dtype."""
        t, h, d = out.shape
        packed = torch.cat([out.float(), lse.float()[..., None]], dim=-1)
        gathered = torch.empty((self.world_size * t, h, d + 1), dtype=torch.float32, device=out.device)
        _all_gather(gathered, packed)
        gathered = gathered.view(self.world_size, t, h, d + 1)
        outs, lses = gathered[..., :d], gathered[..., d]
        total = torch.logsumexp(lses, dim=0)
        weights = torch.exp(lses - total).nan_to_num(0.0)  # a rank that held nothing (lse -inf) weighs 0
        return (outs * weights[..., None]).sum(dim=0).to(out.dtype)

    def from_leader(self, *values: int) -> tuple[int, ...]:
        """Rank 0's ``values`` (small integers: a token id, a flag) on every rank; the others' are ignored."""
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return tuple(t.tolist())

    def share(self, message: object = None) -> object:
        """Rank 0's picklable ``message`` on every rank (the others pass nothing): how a rank that follows rank 0
        (the app's, whose work comes from the UI) learns what to run next. It goes over a CPU (gloo) group of its
        own, made at the first call, whose wait has no practical limit: an idle follower waits here for hours."""
        if self._orders is None:
            self._orders = dist.new_group(backend="gloo", timeout=IDLE)
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self._orders)
        return box[0]

    def close(self) -> None:
        """Leave the group (at the end of a run: every rank calls it)."""
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def quiet_interrupt() -> Iterator[None]:
    """End a Ctrl-C with one line on stderr and exit status 130 instead of a traceback: under torchrun the
    interrupt reaches every rank, and each would print its own, from inside whatever collective it waited in."""
    try:
        yield
    except KeyboardInterrupt:
        rank = f" (rank {os.environ['RANK']})" if ContextGroup.launched() else ""
        print(f"interrupted{rank}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


# One all-gather into a flat tensor: named all_gather_single from torch 2.13 on, where the older name warns; the
# GPU machines' torch (2.11) has only all_gather_into_tensor.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ShardedKVCache(DuoKVCache):
    """A ``DuoKVCache`` whose retrieval heads hold only this rank's share of the tokens (``TokenShards`` with the
    key group as block); streaming heads, ``seq_len`` and ``check_room`` are global, as in one process.

    Contract: every rank of ``group`` makes the same calls (same forwards, restores, resets) in the same order.
    ``spec`` must come from ``TokenShards.rank_spec`` (or hold at least rank 0's share of ``spec.max_tokens``)."""

    def __init__(
        self,
        spec: CacheSpec,
        device: torch.device | str,
        group: ContextGroup,
        prefix_attention: PrefixAttention = kv_attention.quantized_prefix_attention,
    ):
        super().__init__(spec, device, prefix_attention)
        self.group = group
        self.shards = TokenShards(group.world_size, spec.config.key_group)
        need = self.shards.held(spec.max_tokens, 0)
        if spec.capacity < need:
            raise ValueError(
                f"a rank's share of {spec.max_tokens:,} tokens over {group.world_size} ranks is {need:,} tokens, "
                f"but the spec has {spec.capacity:,} retrieval slots: build it with TokenShards.rank_spec"
            )

    @property
    def retrieval_len(self) -> int:
        return self.shards.held(self.seq_len, self.group.rank)

    def retrieval_len_at(self, seq_len: torch.Tensor) -> torch.Tensor:
        return self.shards.held_at(seq_len, self.group.rank)

    def step_output(self, layer: int, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """The retrieval heads' partials merged over the ranks (one all-gather, which a CUDA graph captures with
        NCCL); the streaming heads' output as it is: every rank holds them whole and computed the same."""
        n = self.n_retrieval[layer] * (out.shape[1] // self.args.n_kv_heads)  # their query heads
        if n:
            out[:, :n] = self.group.merge(out[:, :n], lse[:, :n])
        return out

    def _retrieval(self, layer: int, q, k, v) -> torch.Tensor:
        s, held = self.layers[layer], self.retrieval_len
        runs = self.shards.owned_runs(self.seq_len, k.shape[1], self.group.rank)
        k_own, v_own = _take(k, runs), _take(v, runs)
        if self.config.kv_bits == 16:
            out, lse = dense_attention(
                q, s["k_data"][:, :held], s["v_data"][:, :held], n_ctx=held, sm_scale=self.sm_scale
            )
            s["k_data"][:, held : held + k_own.shape[1]] = k_own
            s["v_data"][:, held : held + k_own.shape[1]] = v_own
        else:
            group = self.config.key_group
            n_quant, tail_len = held // group * group, held % group
            k_fp, v_fp = self._fp_run(s, k_own, v_own, tail_len)
            out, lse = dense_attention(
                q, k_fp[:, :tail_len], v_fp[:, :tail_len], n_ctx=tail_len, sm_scale=self.sm_scale
            )
            out, lse = self._with_prefix(layer, q, out, lse, n_quant)
            self._append_quantized(s, k_fp, v_fp, n_quant)
        if self.group.is_leader:  # the new tokens' own causal attention: counted once, by rank 0
            out, lse = merge(out, lse, *dense_attention(q, k, v, n_ctx=0, sm_scale=self.sm_scale))
        return self.group.merge(out, lse)

    def retrieval_keys(self, layer: int, start: int, end: int) -> torch.Tensor:
        raise NotImplementedError(
            "reading retrieval keys by position needs every rank's share; with context parallelism it is not "
            "available yet (answer without evidence)"
        )


def _take(x: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    """``x`` [H, T, D] at the token offsets of ``runs``, in order (a view when they are one run)."""
    if len(runs) == 1:
        return x[:, runs[0][0] : runs[0][1]]
    return torch.cat([x[:, a:b] for a, b in runs], dim=1) if runs else x[:, :0]
