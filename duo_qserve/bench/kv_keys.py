"""KV4 keys: which 4-bit key scheme serves retrieval best, measured on real keys, values and queries (CPU).

The cache keeps retrieval-head keys after RoPE, 4 bits per channel over 128-token groups (``quant.kv_quant``).
RoPE turns each channel pair by a position-dependent angle, so a post-RoPE channel swings between its pair's two
pre-RoPE values within a group, while pre-RoPE channels keep stable outliers (and Qwen's k_proj bias, a constant
offset per channel). This benchmark compares, at the same 4-bit codes (``SCHEMES``; asymmetric, fp16 scale and
zero, as the cache stores them):

- ``post-ch128`` (today), ``post-ch64``: post-RoPE keys per channel over 128 / 64-token groups;
- ``pre-ch128``, ``pre-ch64``: pre-RoPE keys per channel, RoPE applied after de-quantization;
- ``had-ch128``, ``had-tok``: post-RoPE keys times an orthogonal Hadamard ``H`` of the head dimension (queries get
  the same ``H``, so ``q . k`` is unchanged), then per channel over 128 tokens, or per token;
- ``post-tok``, ``pre-tok``: per-token keys (one scale and zero per token and head), for reference.

Part ``attention`` captures, for each model, text (the essays' evaluation split and the pydocs haystack,
``duo_qserve.data``) and length, one fp32 forward's post-RoPE keys, values and the last ``QUERIES`` queries of
every layer; those queries attend over the ``length`` tokens before them (whole key groups, the quantized arena).
Per (layer, query head) and scheme, against the unquantized keys (values stay fp32, so only the keys differ): KL of
the softmax over keys, relative error of the attention output, RMS error of the scaled logits, and over the keys
after the first ``SINKS`` (attention sinks): recall of the top-``TOP`` keys, whether the top key stays on top, and
the error of the mass on the reference top keys. Summaries: mean, median and 90th percentile over heads, for all
heads and for the retrieval heads of the trained pattern at 50% sparsity; and the fraction of heads where a scheme's
KL beats today's.

Part ``niah``: needle-in-a-haystack documents (``duo_qserve.eval.niah``'s grid, needles and haystacks), every head a
retrieval head, greedy answers. A document is pre-filled once in fp32 (full attention, a 16-bit cache); then for
each scheme its whole key groups are replaced by the scheme's quantize-dequantize and its values by 4-bit
per-token ones (as the cache stores them), and every question is answered from that cache (question and answer
tokens stay fp, as the cache's tail would). Pre-fill thus attends to fp keys, as QServe's does; only the decode
reads the simulated cache. Schemes answer the same documents, so besides each found rate (Wilson 95% interval) the
file counts the questions a scheme gets right and today's scheme wrong, and the reverse.

    python -m duo_qserve.bench.kv_keys --part attention --attention default=4096 \
        --attention qwen2.5-coder-0.5b=4096,8192
    python -m duo_qserve.bench.kv_keys --part niah --niah default=2048 --depths 10,50,90 --trials 2 --deadline 1500
    python -m duo_qserve.bench.kv_keys --part niah --name qwen2.5-coder-0.5b --niah qwen2.5-coder-0.5b=4096 \
        --depths 10,50,90 --kinds number,two-facts --schemes fp-keys-v4,post-ch128,post-ch64,pre-ch128 --deadline 1200

On 2 shared CPU cores, one thread each, the three took 27, 25 and 20 minutes (the last two to their deadlines).

Results: ``benchmarks/results/kv-keys-<part>-cpu-<date>.json``. Accuracy only: nothing here times a kernel.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from duo_qserve.environment import REPO_ROOT
from duo_qserve.eval.common import _finite
from duo_qserve.kernels.attention import apply_rope
from duo_qserve.kernels.hadamard import hadamard_matrix
from duo_qserve.model import CausalAttention, rope_cos_sin
from duo_qserve.quant.kv_quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
BITS = 4
QUERIES = 64  # last queries of the text, each attending over every key before them
TOP = 32  # top-attended keys whose recall and mass are compared
SINKS = 4  # first keys left out of the top-key metrics: attention sinks take most of the mass of many heads
SPARSITY = 0.5  # the trained pattern's retrieval heads at this sparsity are summarized apart

Keys = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---- schemes ---------------------------------------------------------------------------------------------------
def rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of keys k [H, T, D] at the positions of the tables cos/sin [T, D/2]."""
    return apply_rope(k.transpose(0, 1), cos, sin).transpose(0, 1)


def unrope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rope``: each channel pair turned back by its angle."""
    return rope(k, cos, -sin)


def per_channel(k: torch.Tensor, group: int) -> torch.Tensor:
    """``quant.kv_quant``'s per-channel keys, quantized and de-quantized."""
    return dequantize_keys(*quantize_keys(k, BITS, group), BITS, group)


def per_token(k: torch.Tensor) -> torch.Tensor:
    """One scale and zero per token (``quant.kv_quant.quantize_values``), quantized and de-quantized."""
    return dequantize_values(*quantize_values(k, BITS), BITS)


def hadamard(d: int, device=None) -> torch.Tensor:
    """The normalized Hadamard matrix of the head dimension (symmetric and its own inverse), fp32."""
    return hadamard_matrix(d).float().to(device)


@dataclass(frozen=True)
class Scheme:
    description: str
    keys: Keys  # (post-RoPE keys [H, T, D], cos, sin) -> the post-RoPE keys attention sees after de-quantization
    scale_bytes: Callable[[int], float]  # fp16 scale + zero bytes per token and head, for head_dim d

    def overhead(self, d: int) -> dict:
        """Bytes per token and head: the codes', the scales', and the scales as a share of the codes."""
        data = d * BITS / 8
        s = self.scale_bytes(d)
        return dict(data_bytes=data, scale_bytes=s, scale_overhead=s / data)


def _post_ch(group: int) -> Keys:
    return lambda k, cos, sin: per_channel(k, group)


def _pre_ch(group: int) -> Keys:
    return lambda k, cos, sin: rope(per_channel(unrope(k, cos, sin), group), cos, sin)


def _had(quantize: Callable[[torch.Tensor], torch.Tensor]) -> Keys:
    def keys(k, cos, sin):
        h = hadamard(k.shape[-1], k.device)
        return quantize(k @ h) @ h  # H H = I: back to the key space, where q . k is the rotated q . k

    return keys


SCHEMES: dict[str, Scheme] = {
    "post-ch128": Scheme(
        "today: post-RoPE, per channel over 128 tokens", _post_ch(128), lambda d: 4 * d / 128
    ),
    "post-ch64": Scheme("post-RoPE, per channel over 64 tokens", _post_ch(64), lambda d: 4 * d / 64),
    "pre-ch128": Scheme(
        "pre-RoPE, per channel over 128 tokens, RoPE after de-quantization",
        _pre_ch(128),
        lambda d: 4 * d / 128,
    ),
    "pre-ch64": Scheme(
        "pre-RoPE, per channel over 64 tokens, RoPE after de-quantization", _pre_ch(64), lambda d: 4 * d / 64
    ),
    "had-ch128": Scheme(
        "post-RoPE x Hadamard (q too), per channel over 128 tokens",
        _had(lambda k: per_channel(k, 128)),
        lambda d: 4 * d / 128,
    ),  # fmt: skip
    "had-tok": Scheme("post-RoPE x Hadamard (q too), per token", _had(per_token), lambda d: 4.0),
    "post-tok": Scheme("post-RoPE, per token", lambda k, cos, sin: per_token(k), lambda d: 4.0),
    "pre-tok": Scheme(
        "pre-RoPE, per token, RoPE after de-quantization",
        lambda k, cos, sin: rope(per_token(unrope(k, cos, sin)), cos, sin),
        lambda d: 4.0,
    ),  # fmt: skip
}
BASELINE = "post-ch128"


# ---- capture ---------------------------------------------------------------------------------------------------
class Capture(CausalAttention):
    """Causal attention that keeps every layer's post-RoPE keys and values [Hkv, T, D] and last queries
    [n_queries, Hq, D] (fp32)."""

    def __init__(self, n_queries: int):
        self.n_queries = n_queries
        self.k, self.v, self.q = {}, {}, {}

    def attend(self, layer, q, k, v):
        self.k[layer] = k.transpose(0, 1).float().clone()
        self.v[layer] = v.transpose(0, 1).float().clone()
        if self.n_queries:
            self.q[layer] = q[-self.n_queries :].float().clone()
        return super().attend(layer, q, k, v)


def capture(model, ids: list[int], n_queries: int) -> Capture:
    cache = Capture(n_queries)
    with torch.inference_mode():
        model.hidden_states(torch.tensor(ids, dtype=torch.long), cache)
    return cache


# ---- attention metrics -----------------------------------------------------------------------------------------
METRICS = ("kl", "out_rel_err", "logit_rms", "top_recall", "top1_kept", "top_mass_err", "key_rel_err")


def head_metrics(
    q: torch.Tensor, k_ref: torch.Tensor, k_hat: torch.Tensor, v: torch.Tensor, sm: float
) -> dict:
    """Metrics of rows q [R, D] attending over keys k_ref vs k_hat [P, D] with values v [P, D] (see the module
    docstring), each averaged over the rows."""
    s_ref, s_hat = (q @ k_ref.T) * sm, (q @ k_hat.T) * sm
    lp_ref, lp_hat = torch.log_softmax(s_ref, -1), torch.log_softmax(s_hat, -1)
    p_ref, p_hat = lp_ref.exp(), lp_hat.exp()
    kl = (p_ref * (lp_ref - lp_hat)).sum(-1)
    o_ref, o_hat = p_ref @ v, p_hat @ v
    out_err = (o_hat - o_ref).norm(dim=-1) / o_ref.norm(dim=-1).clamp_min(1e-12)
    top = min(TOP, k_ref.shape[0] - SINKS)
    ref_top = p_ref[:, SINKS:].topk(top, -1).indices
    hat_top = p_hat[:, SINKS:].topk(top, -1).indices
    recall = (ref_top[:, :, None] == hat_top[:, None, :]).any(-1).float().mean(-1)
    kept = (ref_top[:, 0] == hat_top[:, 0]).float()
    mass_ref = p_ref[:, SINKS:].gather(-1, ref_top).sum(-1)
    mass_hat = p_hat[:, SINKS:].gather(-1, ref_top).sum(-1)
    return dict(
        kl=kl.mean().item(), out_rel_err=out_err.mean().item(),
        logit_rms=(s_hat - s_ref).pow(2).mean().sqrt().item(), top_recall=recall.mean().item(),
        top1_kept=kept.mean().item(), top_mass_err=((mass_hat - mass_ref).abs() / mass_ref).mean().item(),
        key_rel_err=((k_hat - k_ref).norm() / k_ref.norm()).item(),
    )  # fmt: skip


def attention_run(cap: Capture, args, n_keys: int, inv_freq: torch.Tensor, schemes: list[str]) -> dict:
    """Per scheme and metric, a [layers][query heads] table over the captured layers."""
    g, sm = args.q_per_kv, 1.0 / math.sqrt(args.head_dim)
    cos, sin = rope_cos_sin(inv_freq, torch.arange(n_keys))
    out = {s: {m: [] for m in METRICS} for s in schemes}
    for layer in range(args.n_layers):
        k, v, q = cap.k[layer][:, :n_keys], cap.v[layer][:, :n_keys], cap.q[layer]
        rows = {s: {m: [] for m in METRICS} for s in schemes}
        for name in schemes:
            k_hat = SCHEMES[name].keys(k, cos, sin)
            for hq in range(args.n_heads):
                h = hq // g
                m = head_metrics(q[:, hq], k[h], k_hat[h], v[h], sm)
                for key in METRICS:
                    rows[name][key].append(m[key])
        for name in schemes:
            for key in METRICS:
                out[name][key].append(rows[name][key])
    return out


def summarize(tables: dict, retrieval: np.ndarray | None) -> dict:
    """Per scheme and metric: mean, median, p90 over (layer, query head); the same over retrieval heads; and the
    fraction of heads where the scheme's KL is below the baseline's."""
    base = np.asarray(tables[BASELINE]["kl"]) if BASELINE in tables else None
    out = {}
    for name, metrics in tables.items():
        entry = {}
        for key, table in metrics.items():
            a = np.asarray(table, dtype=float)
            entry[key] = _stats(a.ravel())
            if retrieval is not None:
                entry[key]["retrieval_heads"] = _stats(a[retrieval])
        if base is not None:
            entry["kl_below_baseline"] = float((np.asarray(metrics["kl"]) < base).mean())
        out[name] = entry
    return out


def _stats(a: np.ndarray) -> dict:
    return dict(mean=_r(a.mean()), median=_r(np.median(a)), p90=_r(np.quantile(a, 0.9)), max=_r(a.max()))


def _r(x: float) -> float:
    return float(f"{float(x):.4g}")


def retrieval_query_heads(model_name: str, args) -> np.ndarray | None:
    """[layers, query heads] bool: the query heads of the trained pattern's retrieval KV heads at SPARSITY."""
    from duo_qserve.engine import PATTERNS_DIR
    from duo_qserve.patterns import load_pattern

    d = PATTERNS_DIR / model_name
    if not d.is_dir():
        return None
    mask, _ = load_pattern(d).retrieval_mask(SPARSITY)
    return np.repeat(np.asarray(mask, dtype=bool), args.q_per_kv, axis=1)


def texts(essays: str | None) -> dict[str, str]:
    from duo_qserve import data

    return {"essays": data.essay_text("evaluation", essays), "pydocs": data.pydocs_text()}


def attention_part(models: dict[str, list[int]], essays: str | None, schemes: list[str], log=print) -> dict:
    from duo_qserve.loading import load_model

    runs = []
    for spec, lengths in models.items():
        loaded = load_model(spec, "cpu", torch.float32)
        model, args = loaded.model.eval(), loaded.model.args
        retrieval = retrieval_query_heads(loaded.name, args)
        for text_name, text in texts(essays).items():
            ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
            for n in lengths:
                if len(ids) < n + QUERIES:
                    raise ValueError(f"{text_name} has {len(ids):,} tokens, fewer than {n + QUERIES:,}")
                t0 = time.perf_counter()
                cap = capture(model, ids[: n + QUERIES], QUERIES)
                t1 = time.perf_counter()
                tables = attention_run(cap, args, n, model.inv_freq, schemes)
                del cap
                summary = summarize(tables, retrieval)
                log(
                    f"{loaded.name} {text_name} {n}: capture {t1 - t0:.0f} s, metrics {time.perf_counter() - t1:.0f} s"
                )
                for name in schemes:
                    s = summary[name]
                    log(f"  {name:>11}: KL {s['kl']['mean']:.4g} (median {s['kl']['median']:.3g}), "
                        f"out err {s['out_rel_err']['mean']:.4f}, top-{TOP} recall {s['top_recall']['mean']:.3f}, "
                        f"top-1 kept {s['top1_kept']['mean']:.3f}")  # fmt: skip
                runs.append(dict(
                    model=loaded.name, text=text_name, keys=n, queries=QUERIES,
                    retrieval_heads=None if retrieval is None else int(retrieval.sum()),
                    seconds=dict(capture=round(t1 - t0, 1), metrics=round(time.perf_counter() - t1, 1)),
                    summary=summary, per_head=per_head(tables),
                ))  # fmt: skip
        head_dim = args.head_dim
        for r in runs:
            if r["model"] == loaded.name:
                r["overhead"] = {s: SCHEMES[s].overhead(head_dim) for s in schemes}
    return dict(runs=runs)


PER_HEAD = ("kl", "out_rel_err", "top_recall", "top1_kept")  # the per-head tables kept in the file


def per_head(tables: dict) -> dict:
    """The [layers][query heads] tables of ``PER_HEAD`` for each scheme, to 3 significant digits (the file keeps
    every metric's summary; all seven tables of every run would make it megabytes)."""
    return {
        s: {m: [[float(f"{x:.3g}") for x in row] for row in t[m]] for m in PER_HEAD}
        for s, t in tables.items()
    }


def dumps(result: dict) -> str:
    """JSON, indented, with every list of numbers on one line: a per-head table is a line per layer."""
    text = json.dumps(_finite(result), indent=1)
    # A list's own line break follows its "[" (a string's are escaped), and only numbers and nulls may follow.
    return re.sub(r"\[\n[-+0-9.eE,\snul]*\]", lambda m: re.sub(r"\s+", "", m.group(0)), text) + "\n"


# ---- NIAH ------------------------------------------------------------------------------------------------------
def simulated_cache(cache, fp: list, inv_freq: torch.Tensor, scheme: str | None, values: bool) -> None:
    """Write into the 16-bit cache's whole groups the keys (and 4-bit per-token values, if ``values``) that
    ``scheme`` would leave (None: the fp keys) from the fp copies ``fp`` [(k, v) per layer]."""
    n = fp[0][0].shape[1]
    cos, sin = rope_cos_sin(inv_freq, torch.arange(n))
    for layer, (k, v) in zip(cache.layers, fp, strict=True):
        layer["k_data"][:, :n] = k if scheme is None else SCHEMES[scheme].keys(k, cos, sin).to(k.dtype)
        layer["v_data"][:, :n] = per_token(v).to(v.dtype) if values else v


NIAH_SCHEMES = ["fp-keys-v4", "post-ch128", "post-ch64", "pre-ch128", "had-ch128"]
NIAH_NEW_TOKENS = (
    16  # enough for "The secret number is 4821377." in either tokenizer; greedy answers rarely wait
)


def prefill_fp(engine, ids: list[int]) -> None:
    """The document ``ids`` pre-filled in one fp32 forward (causal SDPA: several times faster on the CPU than the
    cache's chunked reference attention) into the engine's 16-bit cache, checkpointed, as ``Engine.ingest``
    leaves it."""
    from duo_qserve.engine import DocumentInfo, token_sha256

    t0 = time.perf_counter()
    cap = capture(engine.model, ids, 0)
    cache, n = engine.cache, len(ids)
    cache.reset()
    for layer, s in enumerate(cache.layers):
        s["k_data"][:, :n], s["v_data"][:, :n] = cap.k[layer], cap.v[layer]
    cache.set_length(n)
    cache.checkpoint()
    engine.document = DocumentInfo("document", n, token_sha256(ids), time.perf_counter() - t0, "",
                                   prefilled=n, ids=np.asarray(ids, dtype=np.int32))  # fmt: skip


def niah_part(models: dict[str, list[int]], essays: str | None, trials: int, depths: list[float],
              kinds: list[str], schemes: list[str], deadline: float | None, log=print) -> dict:  # fmt: skip
    from duo_qserve.engine import ANSWER_RESERVE, Engine, EngineSettings
    from duo_qserve.eval import niah
    from duo_qserve.loading import load_model

    pools = niah.needle_pools(niah.BUILTIN_NEEDLES, kinds)
    runs = []
    for spec, lengths in models.items():
        loaded = load_model(spec, "cpu", torch.float32)
        settings = EngineSettings(model=loaded.source, device="cpu", pattern=None, sparsity=0.0, kv_bits=16,
                                  w8a8=False, chunk_size=2048, max_tokens=max(lengths) + ANSWER_RESERVE + 256)  # fmt: skip
        engine = Engine(loaded, settings)
        haystacks = [niah.Haystack(n, t, loaded.tokenizer, s)
                     for n, s, t in (niah.haystack_text(h, essays) for h in ("essays", "pydocs"))]  # fmt: skip
        grid = niah.Grid(lengths, depths, kinds, trials)
        records = {s: [] for s in schemes}
        group = 128
        t_start = time.perf_counter()
        stopped = "finished"
        for trial in range(trials):
            for doc in niah.trial_documents(engine, haystacks, pools, grid, trial):
                if deadline is not None and time.monotonic() > deadline:
                    stopped = "deadline"
                    break
                t0 = time.perf_counter()
                ids = engine.document_ids(doc.text)
                prefill_fp(engine, ids)
                whole = len(ids) // group * group
                fp = [
                    (lay["k_data"][:, :whole].clone(), lay["v_data"][:, :whole].clone())
                    for lay in engine.cache.layers
                ]
                hits = []
                for name in schemes:
                    key_scheme = None if name in ("fp", "fp-keys-v4") else name
                    simulated_cache(engine.cache, fp, engine.model.inv_freq, key_scheme, values=name != "fp")
                    for fact in doc.facts:
                        answer = niah.short_answer(
                            engine, fact.question, NIAH_NEW_TOKENS, niah.SAMPLINGS["greedy"]
                        )
                        records[name].append(dict(
                            trial=trial, haystack=doc.haystack, kind=doc.kind, length=doc.length, depth=fact.depth,
                            expected=fact.answer, answer=answer, found=niah.found(fact.kind, answer, fact.answer),
                        ))  # fmt: skip
                    hits.append(f"{name} {sum(r['found'] for r in records[name][-len(doc.facts) :])}")
                simulated_cache(engine.cache, fp, engine.model.inv_freq, None, values=False)
                log(f"{loaded.name} trial {trial} {doc.haystack} {doc.kind} {doc.length} {doc.depth:g}%: "
                    f"{', '.join(hits)} of {len(doc.facts)} ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
            else:
                continue
            break
        runs.append(dict(model=loaded.name, lengths=lengths, depths=depths, kinds=kinds, trials=trials,
                         stopped=stopped, seconds=round(time.perf_counter() - t_start, 1),
                         schemes=niah_summary(records), records=records))  # fmt: skip
    return dict(runs=runs)


def niah_summary(records: dict[str, list[dict]]) -> dict:
    """Per scheme: found with its Wilson 95% interval; against today's scheme (same questions), the questions
    only this scheme found and those only today's found."""
    from duo_qserve.eval.niah import wilson

    base = records.get(BASELINE)
    out = {}
    for name, recs in records.items():
        k, n = sum(r["found"] for r in recs), len(recs)
        entry = dict(found=k / n if n else math.nan, questions=n, ci95=[_r(x) for x in wilson(k, n)])
        if base is not None and len(base) == n:
            entry["only_this"] = sum(r["found"] and not b["found"] for r, b in zip(recs, base, strict=True))
            entry["only_baseline"] = sum(
                b["found"] and not r["found"] for r, b in zip(recs, base, strict=True)
            )
        out[name] = entry
    return out


# ---- command line ----------------------------------------------------------------------------------------------
def _model_lengths(items: list[str] | None) -> dict[str, list[int]]:
    out = {}
    for item in items or []:
        name, sep, lengths = item.partition("=")
        if not sep or not lengths:
            raise ValueError(f"expected MODEL=LENGTH[,LENGTH...], got {item!r}")
        out[name] = [int(x) for x in lengths.split(",")]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m duo_qserve.bench.kv_keys", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--part", choices=("attention", "niah"), required=True)
    p.add_argument(
        "--attention", action="append", metavar="MODEL=LENGTHS", help="attention part: keys per run"
    )
    p.add_argument("--niah", action="append", metavar="MODEL=LENGTHS", help="niah part: document lengths")
    p.add_argument("--schemes", default=None, help=f"comma-separated, of: {', '.join(SCHEMES)} (niah also: fp, "
                   "fp-keys-v4)")  # fmt: skip
    p.add_argument("--trials", type=int, default=1)
    p.add_argument("--depths", default="10,30,50,70,90")
    p.add_argument("--kinds", default="number,word,two-facts")
    p.add_argument(
        "--essays", default=str(REPO_ROOT.parent / "shared" / "data" / "haystack" / "paul_graham_essays")
    )
    p.add_argument(
        "--deadline", type=float, default=None, metavar="SECONDS", help="niah: no new document after"
    )
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--name", default=None, help="results file kv-keys-<part>-<name>-cpu-<date>.json")
    return p


def main(argv: list[str] | None = None) -> int:
    from duo_qserve.eval.common import result_header

    a = build_parser().parse_args(argv)
    t0 = time.monotonic()
    header = result_header("duo_qserve.bench.kv_keys", argv, "cpu") | dict(
        threads=torch.get_num_threads(), bits=BITS,
        schemes={n: s.description for n, s in SCHEMES.items()}, baseline=BASELINE,
    )  # fmt: skip
    if a.part == "attention":
        schemes = a.schemes.split(",") if a.schemes else list(SCHEMES)
        header |= dict(queries=QUERIES, top=TOP, sinks=SINKS, retrieval_sparsity=SPARSITY,
                       metrics=dict(kl="KL(p_ref || p_scheme) of the softmax over keys, mean over queries",
                                    out_rel_err="|o - o_ref| / |o_ref|, values fp32",
                                    logit_rms="RMS error of q.k / sqrt(d)",
                                    top_recall=f"recall of the reference top-{TOP} keys (after {SINKS} sinks)",
                                    top1_kept="the reference top key (after the sinks) is the scheme's top key",
                                    top_mass_err=f"relative error of the probability mass on the reference top-{TOP}",
                                    key_rel_err="|k_hat - k| / |k| over the head"))  # fmt: skip
        result = header | attention_part(_model_lengths(a.attention), a.essays, schemes)
    else:
        schemes = a.schemes.split(",") if a.schemes else NIAH_SCHEMES
        deadline = t0 + a.deadline if a.deadline else None
        result = header | niah_part(_model_lengths(a.niah), a.essays, a.trials,
                                    [float(x) for x in a.depths.split(",")], a.kinds.split(","), schemes, deadline)  # fmt: skip
    result["seconds"] = round(time.monotonic() - t0, 1)
    out = Path(a.out_dir) / f"kv-keys-{a.part}{'-' + a.name if a.name else ''}-cpu-{header['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(result))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
