"""Retrieval-head identification: learn one gate per KV head that says how much the head needs the full context.

Every KV head of every layer gets a scalar gate α (init 1.0, clamped to [0, 1]). In the gated model each head's
attention output is ``α·full + (1-α)·streaming``, where *full* is causal attention over every earlier token and
*streaming* sees only the first ``sink`` tokens and the last ``recent`` ones (token-exact: key j is visible to query
i iff ``j <= i and (j < sink or j > i - recent)``). The model weights are frozen; the loss is the MSE between the gated
model's final hidden states and those of the plain full-attention model on the answer tokens of a multi-passkey
retrieval sample, plus ``reg_weight · mean|α|`` pushing heads towards streaming. Heads whose gates stay high are the
retrieval heads (see ``docs`` section A of the DuoAttention reference).

The gated forward needs no model change: ``GatedAttention`` is a "cache" whose ``attend`` computes both attentions
from the q/k/v it is handed and mixes them.

Run: ``python -m duo_qserve.train_patterns --model default --out attn_patterns/SmolLM2-135M-Instruct --steps 120``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from duo_qserve.data import ORDINALS, PasskeyRetrieval, SampleFn
from duo_qserve.environment import REPO_ROOT
from duo_qserve.loading import load_model
from duo_qserve.model import CausalAttention, Transformer
from duo_qserve.patterns import load_pattern, random_pattern, save_pattern, sparsify


@dataclass
class TrainSettings:
    """Every setting of a run; written verbatim into the pattern's ``config.json``."""

    model_name: str = "default"
    steps: int = 120
    lr: float = 0.02
    reg_weight: float = 0.05
    initial_value: float = 1.0
    sink_size: int = 32
    recent_size: int = 128
    context_length_min: int = 512
    context_length_max: int = 1536
    context_lengths_num_intervals: int = 8
    num_passkeys: int = 3
    passkey_length: int = 6
    min_needle_depth_ratio: float = 0.05
    max_needle_depth_ratio: float = 0.95
    depth_ratio_num_intervals: int = 1000
    dataset_name: str = "paul_graham_essays (multi-passkey retrieval)"
    supervision: str = "distill"
    streaming_attn_implementation: str = "sdpa over sink + band blocks (token-exact)"
    full_attention_term: str = "recomputed on the gated model's q/k/v"
    checkpoint_every: int = 10
    recompute: bool = False  # activation recompute per block (memory only: the same gradients)
    seed: int = 42
    device: str = "cpu"
    dtype: str = "float32"


# ---- the gated attention ---------------------------------------------------------------------------------------
def streaming_attention(
    qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor, sink: int, recent: int
) -> torch.Tensor:
    """Attention of [H, T, D] heads where key j is visible to query i iff ``j <= i and (j < sink or j > i -
    recent)`` (token-exact), back as [H, T, D], in memory O(T·(sink + 2·recent)) instead of a [T, T] mask's.

    Queries go in blocks of ``recent``; block n attends to the sink tokens and to the band of keys from ``recent``
    before its first query to its last. A sink key counts only outside the band (``j <= i - recent``), a band key
    only inside it (``i - recent < j <= i``), so no key is seen twice and every query sees at least itself."""
    if recent < 1:
        raise ValueError(f"recent must be at least 1, got {recent}")
    h, t, d = qh.shape
    b, s = recent, min(sink, t)
    nb = -(-t // b)
    pad = nb * b - t
    band = recent + b
    k_band = F.pad(kh, (0, 0, recent, pad)).unfold(1, band, b).transpose(-1, -2)  # [H, nb, band, D]
    v_band = F.pad(vh, (0, 0, recent, pad)).unfold(1, band, b).transpose(-1, -2)
    keys = torch.cat([kh[:, None, :s].expand(h, nb, s, d), k_band], dim=2)
    values = torch.cat([vh[:, None, :s].expand(h, nb, s, d), v_band], dim=2)
    i = torch.arange(nb * b, device=qh.device).view(nb, b, 1)  # query positions
    j_sink = torch.arange(s, device=qh.device).view(1, 1, s)
    j_band = (torch.arange(nb, device=qh.device) * b - recent).view(nb, 1, 1) + torch.arange(
        band, device=qh.device
    )
    mask = torch.cat(
        [(j_sink <= i - recent).expand(nb, b, s), (j_band >= 0) & (j_band <= i) & (j_band > i - recent)],
        dim=-1,
    )
    out = F.scaled_dot_product_attention(
        F.pad(qh, (0, 0, 0, pad)).view(h, nb, b, d), keys, values, attn_mask=mask
    )
    return out.reshape(h, nb * b, d)[:, :t]


class GatedAttention(CausalAttention):
    """Each head's output is ``α·full + (1-α)·streaming``, both computed from the same q/k/v of the gated model.

    This differs from the reference, which mixes the student's streaming output with the *teacher branch's* full
    attention output at that layer (computed from the teacher's own hidden states and detached). Here the full term
    is recomputed on the gated model's q/k/v, the conceptual form of the paper's figure, because (a) it is what a
    deployed retrieval head does: its q/k/v are perturbed by the streaming heads of earlier layers, and the loss
    sees that; (b) it needs no second, layer-by-layer synchronized teacher pass, only the teacher's final hidden
    states, computed once per sample without grad: on a CPU that halves the memory of the forward. The cost is a
    second attention per layer, small next to the MLPs at these lengths.
    """

    def __init__(self, gates: torch.Tensor, sink: int, recent: int):
        self.gates, self.sink, self.recent = gates, sink, recent

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        qh, kh, vh = self.heads(q, k, v)
        full = self.causal_heads(qh, kh, vh)
        stream = streaming_attention(qh, kh, vh, self.sink, self.recent)
        q_per_kv = q.shape[1] // k.shape[1]
        alpha = self.gates[layer].clamp(0, 1).repeat_interleave(q_per_kv)[:, None, None].to(q.dtype)
        return (stream + alpha * (full - stream)).transpose(0, 1)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, supervised: torch.Tensor) -> torch.Tensor:
    """MSE over the hidden dimension, averaged over the supervised tokens (computed in float32)."""
    diff = (student[supervised].float() - teacher[supervised].float()).pow(2).mean(-1)
    return diff.mean()


def lr_multiplier(step: int, total: int) -> float:
    """The reference schedule: linear warm-up over the first 20% of steps, plateau, linear decay over the last 20%
    (both floored at 0.1)."""
    fifth = max(total / 5, 1)
    return min(1.0, max((step + 1) / fifth, 0.1), max((total - step) / fifth, 0.1))


# ---- training --------------------------------------------------------------------------------------------------
def freeze(model: Transformer) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def train_gates(
    model: Transformer,
    make_sample: SampleFn,
    settings: TrainSettings,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    stop_at: int | None = None,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """Train the gates and return them [layers, kv_heads] (clamped to [0, 1]).

    ``stop_at`` ends the run after that step (a time-boxed run; continue later with ``resume``). With a
    ``checkpoint_dir``, gates, optimizer, scheduler, step and RNG states are saved every ``checkpoint_every`` steps
    and at the end, so a resumed run continues exactly where the saved one stopped.
    """
    freeze(model)
    args = model.args
    device = next(model.parameters()).device
    gates = torch.full(
        (args.n_layers, args.n_kv_heads), settings.initial_value, device=device, requires_grad=True
    )
    opt = torch.optim.AdamW([gates], lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, settings.steps))
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    step = 0
    state_file = checkpoint_dir / "train_state.pt" if checkpoint_dir else None
    if resume:
        if state_file is None or not state_file.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {state_file}")
        state = torch.load(state_file, map_location=device, weights_only=False)
        with torch.no_grad():
            gates.copy_(state["gates"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.setstate(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log(f"resumed from {state_file} at step {step}")

    def save_state() -> None:
        if state_file is None:
            return
        state_file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "gates": gates.detach().cpu(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "step": step,
            "data_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "settings": asdict(settings),
        }
        torch.save(state, state_file.with_suffix(".tmp"))
        state_file.with_suffix(".tmp").replace(state_file)  # a kill mid-write keeps the previous checkpoint

    last = min(settings.steps, stop_at if stop_at is not None else settings.steps)
    while step < last:
        t0 = time.perf_counter()
        sample = make_sample(rng)
        ids, supervised = sample.ids.to(device), sample.supervised.to(device)
        with torch.no_grad():
            teacher = model.hidden_states(ids, CausalAttention())
        with torch.no_grad():
            gates.clamp_(0, 1)
        gated = GatedAttention(gates, settings.sink_size, settings.recent_size)
        student = model.hidden_states(ids, gated, recompute=settings.recompute)
        distill = distill_loss(student, teacher, supervised)
        reg = gates.abs().mean()
        loss = distill + settings.reg_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            gates.clamp_(0, 1)
        step += 1
        log(
            f"step {step}/{settings.steps}  tokens {len(ids)}  loss {loss.item():.5f}  distill {distill.item():.5f}  "
            f"reg {reg.item():.4f}  gate mean {gates.mean().item():.4f}  {time.perf_counter() - t0:.1f} s/step"
        )
        if step % settings.checkpoint_every == 0 or step == last:
            save_state()
    return gates.detach().cpu().numpy().astype(np.float64)


@torch.no_grad()
def deployed_loss(
    model: Transformer,
    gates: np.ndarray,
    sparsity: float,
    make_sample: SampleFn,
    settings: TrainSettings,
    n_samples: int,
    seed: int,
) -> float:
    """Distillation loss of a pattern as it is served: the ``sparsity`` fraction of heads with the lowest gates
    purely streaming (gate 0), every other head full (gate 1), averaged over ``n_samples`` samples drawn with
    ``seed`` (not the training seed, so they are held out).

    The soft gates do not say what the binarized pattern costs; this does, on the training task, so runs with
    different settings (e.g. regularization weights) can be compared without looking at any evaluation."""
    device = next(model.parameters()).device
    full = torch.as_tensor(sparsify(gates, sparsity)[0], dtype=torch.float32, device=device)
    rng, total = random.Random(seed), 0.0
    for _ in range(n_samples):
        sample = make_sample(rng)
        ids, supervised = sample.ids.to(device), sample.supervised.to(device)
        teacher = model.hidden_states(ids, CausalAttention())
        student = model.hidden_states(ids, GatedAttention(full, settings.sink_size, settings.recent_size))
        total += distill_loss(student, teacher, supervised).item()
    return total / n_samples


def validate(
    model: Transformer,
    gates: np.ndarray,
    make_sample: SampleFn,
    settings: TrainSettings,
    sparsity: float,
    n_samples: int,
) -> dict:
    """The held-out deployed loss of the trained pattern beside a random pattern's (``patterns.random_pattern``,
    seed 0, the random control of the NIAH evaluation), for ``config.json``."""
    seed = settings.seed + 1

    def loss(g: np.ndarray) -> float:
        return deployed_loss(model, g, sparsity, make_sample, settings, n_samples, seed)

    return dict(
        sparsity=sparsity, samples=n_samples, seed=seed, distill_trained=loss(gates),
        distill_random=loss(random_pattern(model.args, seed=0).gates),
    )  # fmt: skip


def select_best(candidates: list[Path], out: Path) -> Path:
    """Copy the candidate pattern with the lowest held-out deployed loss (``config.json`` "validation") to ``out``,
    recording every candidate's loss there, so a sweep (e.g. over ``--reg-weight``) is picked on the training task,
    not on an evaluation."""
    losses = {}
    for d in candidates:
        val = load_pattern(d).config.get("validation")
        if not val:
            raise ValueError(
                f"{d} has no held-out validation in its config.json (trained with --validate-samples 0?)"
            )
        losses[str(d)] = val["distill_trained"]
    best = min(losses, key=losses.get)
    pattern = load_pattern(best)
    config = pattern.config | {"selected_from": losses}
    save_pattern(out, np.loadtxt(Path(pattern.source) / "full_attention_heads.tsv", ndmin=2), config)
    return Path(best)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m duo_qserve.train_patterns", description=__doc__.split("\n\n")[0]
    )
    defaults = TrainSettings()
    p.add_argument("--model", default="default", help="'default', a checkpoint dir or a .gguf file")
    p.add_argument(
        "--out", required=True, help="pattern directory to write (full_attention_heads.tsv + config.json)"
    )
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--reg-weight", type=float, default=defaults.reg_weight)
    p.add_argument("--sink", type=int, default=defaults.sink_size)
    p.add_argument("--recent", type=int, default=defaults.recent_size)
    p.add_argument("--deploy-sink", type=int, default=64, help="sink the engine serves with (config.json)")
    p.add_argument("--deploy-recent", type=int, default=256, help="recent window the engine serves with")
    p.add_argument("--context-min", type=int, default=defaults.context_length_min)
    p.add_argument("--context-max", type=int, default=defaults.context_length_max)
    p.add_argument("--passkeys", type=int, default=defaults.num_passkeys)
    p.add_argument("--passkey-length", type=int, default=defaults.passkey_length)
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    p.add_argument(
        "--recompute", action="store_true",
        help="recompute each block's activations in the backward pass (long contexts: memory of one block)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-dir", default=None, help="default: test-output/train_patterns/<out dir name>"
    )
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (resume later)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--essays", default=None, help="directory of *.txt essays (default: $DUO_QSERVE_ESSAYS)")
    p.add_argument(
        "--validate-samples", type=int, default=16,
        help="held-out samples for the deployed loss written to config.json (0: skip)",
    )  # fmt: skip
    p.add_argument(
        "--sparsity", type=float, default=0.5, help="streaming ratio the deployed loss is measured at"
    )
    p.add_argument(
        "--select-from", nargs="+", default=None, metavar="DIR",
        help="no training: copy the trained pattern with the lowest held-out deployed loss among DIRs to --out",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.select_from:
        try:
            best = select_best([Path(d) for d in a.select_from], Path(a.out))
        except ValueError as e:  # a candidate that is no pattern, or has no held-out validation
            p.error(str(e))
        print(f"wrote {a.out} from {best}")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.passkeys > len(ORDINALS):
        p.error(f"--passkeys: at most {len(ORDINALS)}")

    loaded = load_model(a.model, a.device, getattr(torch, a.dtype))
    settings = TrainSettings(
        model_name=loaded.name, steps=a.steps, lr=a.lr, reg_weight=a.reg_weight, sink_size=a.sink,
        recent_size=a.recent, context_length_min=a.context_min, context_length_max=a.context_max,
        num_passkeys=a.passkeys, passkey_length=a.passkey_length, checkpoint_every=a.checkpoint_every,
        recompute=a.recompute, seed=a.seed, device=a.device, dtype=a.dtype,
    )  # fmt: skip
    out = Path(a.out)
    ckpt = (
        Path(a.checkpoint_dir)
        if a.checkpoint_dir
        else REPO_ROOT / "test-output" / "train_patterns" / out.name
    )
    print(json.dumps(asdict(settings)), flush=True)
    t0 = time.perf_counter()
    log = lambda msg: print(msg, flush=True)
    make_sample = PasskeyRetrieval(loaded.tokenizer, settings, a.essays)
    gates = train_gates(
        loaded.model,
        make_sample,
        settings,
        ckpt,
        a.resume,
        a.stop_at,
        log,
    )
    finished = a.stop_at is None or a.stop_at >= settings.steps
    if not finished:
        print(f"stopped at step {a.stop_at}; continue with --resume (checkpoint in {ckpt})")
        return 0
    config = asdict(settings) | {
        "wall_seconds_last_run": round(time.perf_counter() - t0, 1),
        "deploy_sink_size": a.deploy_sink,
        "deploy_recent_size": a.deploy_recent,
    }
    if a.validate_samples:
        config["validation"] = validate(
            loaded.model, gates, make_sample, settings, a.sparsity, a.validate_samples
        )
        print(f"held-out deployed loss: {json.dumps(config['validation'])}", flush=True)
    save_pattern(out, gates, config)
    q = np.quantile(gates, [0.25, 0.5, 0.75])
    print(
        f"wrote {out}: gate mean {gates.mean():.3f}, quartiles {q[0]:.3f}/{q[1]:.3f}/{q[2]:.3f}, "
        f">=0.5: {(gates >= 0.5).sum()}/{gates.size}; {math.ceil(time.perf_counter() - t0)} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
