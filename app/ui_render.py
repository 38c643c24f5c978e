"""What the app shows, as plain functions of engine state: headline, progress bar, memory bar, head map, exports.

Kept apart from the Gradio wiring in ``app.main`` so each picture is a pure function of numbers that can be read
(and tested) without a browser. Styles are inline so the HTML renders the same in any Gradio theme.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Sequence
from typing import Any

from app.sessions import Residency
from duo_qserve.engine import Engine
from duo_qserve.eta import PrefillClock

COMPONENTS = (  # memory components in the order the bar stacks them, with their colours
    ("weights", "Weights", "#6366f1"),
    ("retrieval_kv", "Retrieval KV", "#0ea5e9"),
    ("scales", "KV scales", "#14b8a6"),
    ("streaming_kv", "Streaming KV", "#f59e0b"),
    ("workspace", "Workspace", "#a3a3a3"),
)
RETRIEVAL_COLOUR, STREAMING_COLOUR = "#0ea5e9", "#f59e0b"
# streaming ratios past this cost accuracy in the README's needle test (measured at 50%: no loss; 75%: a large one)
HIGH_STREAMING_RATIO = 0.5
ENDINGS = {  # GenerationStats.ended_by, for people
    "eos": "the model finished",
    "max_tokens": "cut at the token limit",
    "repetition": "stopped: it started repeating itself",
    "stop": "cut at a stop string",
    "cancel": "stopped by the user",
}


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_tokens(n: int) -> str:
    """4.1M, 32.8K, 957: short enough for a headline."""
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    if n >= 10_000:
        return f"{n / 1e3:.1f}K"
    return f"{n:,}"


def fmt_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s // 60:.0f} min {s % 60:02.0f} s"
    return f"{s // 3600:.0f} h {s % 3600 // 60:02.0f} min"


def precision_label(stats: dict) -> str:
    """W8A8KV4 style: weights/activations then KV bits; unquantized weights show their dtype."""
    weights = "W8A8" if stats["w8a8"] else stats["dtype"].upper().replace("FLOAT", "FP")
    return f"{weights}KV{stats['kv_bits']}" if stats["w8a8"] else f"{weights} weights, KV{stats['kv_bits']}"


def capacity_headline(engine: Engine) -> str:
    """The first thing a user needs: how much of a book fits here, with which model and settings."""
    s = engine.stats()
    dev = s["device_memory"]
    ratio = f"{s['sparsity']:.0%} streaming heads"
    if not engine.pattern.learned:
        ratio += " (no trained attention pattern for this model: every head keeps the full context)"
    tokens = f"**{fmt_tokens(engine.max_document_tokens)} tokens**"
    if dev["kind"] == "gpu":
        where = f"This GPU ({dev['name']}, {fmt_bytes(dev['total'])})"
    else:
        where = "This CPU session (no GPU; slow reference kernels)"
    return f"{where} holds {tokens} of **{s['model']}** at {precision_label(s)}, {ratio}."


def document_summary(
    title: str,
    files: Sequence[str],
    chars: int,
    tokens: int,
    fits: int,
    ratio: float | None,
    can_reload: bool = True,
) -> str:
    """Before pre-fill: size, and whether it fits; if not, what would: the streaming ratio ``ratio``, which the
    button applies where this server lets its operator reload (``can_reload``; elsewhere the advice is what the
    user can do instead), with a warning where that ratio costs accuracy."""
    source = html.escape(", ".join(files)) if files else "pasted text"  # an upload's name is the browser's
    head = f"**{html.escape(title)}** ({source}): {chars:,} characters, {tokens:,} tokens."
    if tokens <= fits:
        return f"{head}\n\n**Fits:** the cache holds {fits:,} document tokens. Press **Load into model**."
    if ratio is None:
        advice = (
            "No streaming-head ratio makes it fit in this cache: shorten the document, lower the KV bits, "
            "or start the app with a larger `--max-tokens` (on a GPU: a smaller model or more memory)."
        )
    elif can_reload:
        advice = (
            f"It would fit at **{ratio:.0%} streaming heads**: the operator (with the admin token in Settings) "
            "can press the button below to reload the model with that ratio; or shorten the document."
        )
    else:
        advice = (
            f"It would fit at **{ratio:.0%} streaming heads**, but only the operator of this server can change "
            f"that: shorten the document, or ask the operator to run the app with `--sparsity {ratio:.2f}`."
        )
    if ratio is not None and ratio > HIGH_STREAMING_RATIO:
        advice += (
            " **Expect answers to miss more at that ratio:** in the README's needle-in-a-haystack test, 75% "
            "streaming heads found 0.61 of the needles against 0.99 at 50% (Qwen2.5-Coder-1.5B)."
        )
    return f"{head}\n\n**Too large:** only {fits:,} document tokens fit with these settings. {advice}"


def progress_html(done: int, total: int, elapsed: float, note: str = "", left: float = math.inf) -> str:
    """Pre-fill progress: tokens done/total, tokens/s and the time ``left`` (from ``duo_qserve.eta``), shown as
    "estimating…" until ``PrefillClock.SHOW_FROM`` of the document is done: the first chunks' figure can be far
    off (on a CPU the prior's shape still leads it), and a figure that is no promise should not look like one."""
    frac = done / total if total else 0.0
    rate = done / elapsed if elapsed > 0 and done else 0.0
    eta = fmt_seconds(left) if math.isfinite(left) and frac >= PrefillClock.SHOW_FROM else "estimating…"
    text = f"{done:,} / {total:,} tokens · " + (note or f"{rate:,.0f} tokens/s · {eta} left")
    return (
        f'<div class="prefill-progress" data-done="{done}" data-total="{total}">'
        f'<div style="background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden">'
        f'<div style="background:#6366f1;width:{frac:.1%};height:100%;transition:width .3s"></div></div>'
        f'<div style="font-size:0.9em;margin-top:4px">{frac:.0%} · {html.escape(text)}</div></div>'
    )


def memory_html(engine: Engine, now: float | None = None, books: Residency | None = None) -> str:
    """Device memory used/total, the engine's bytes by component as a stacked bar, context and speed, and with
    ``books`` how many books (every session's, counted, never named) are resident in the budget or wait in a
    library."""
    s = engine.stats()
    dev, mem = s["device_memory"], s["memory"]
    if dev["kind"] == "gpu":
        head = f"GPU {html.escape(dev['name'])}: {fmt_bytes(dev['used'])} used of {fmt_bytes(dev['total'])}"
        scale = dev["total"]  # the bar is the whole GPU, so free memory shows as the empty rest
    else:
        head = (
            f"Running on the CPU: process memory {fmt_bytes(dev['used'])} (machine {fmt_bytes(dev['total'])})"
        )
        scale = max(sum(mem.values()), dev["used"], 1)
    segments, legend = [], []
    for key, label, colour in COMPONENTS:
        n = mem.get(key, 0)
        if key == "workspace" and dev["kind"] == "cpu":
            label = "Workspace and other process memory"  # measured as the rest of the resident set
        segments.append(
            f'<div title="{label}: {fmt_bytes(n)}" style="background:{colour};width:{n / scale:.2%}"></div>'
        )
        legend.append(
            f'<span style="white-space:nowrap;margin-right:12px"><span style="display:inline-block;width:10px;'
            f'height:10px;background:{colour};border-radius:2px"></span> {label} {fmt_bytes(n)}</span>'
        )
    last = s["last_answer"]
    speed = (
        f"last answer: {last['ttft_s']:.2f} s to first token, {last['decode_ms_per_token']:.0f} ms/token"
        if last["answer_tokens"]
        else "no answer yet"
    )
    turns, turn_tokens = engine.conversation_in_cache
    conversation = f"conversation {turns} earlier turn{'s' if turns != 1 else ''}, {turn_tokens:,} tokens"
    clock = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    resident = ""
    if books is not None:
        resident = (
            f'<div style="font-size:0.9em;margin-top:2px">Books on the device: {books.resident} '
            f"({fmt_bytes(books.resident_bytes)} of a {fmt_bytes(books.budget_bytes)} budget) · "
            f"{books.in_libraries} waiting in a library · {books.evictions} evicted, {books.reloads} loaded back "
            f"since start</div>"
        )
    return (
        f'<div class="memory-readout">'
        f'<div style="font-weight:600;margin-bottom:4px">{head}</div>'
        f'<div style="display:flex;height:18px;background:#e5e7eb;border-radius:6px;overflow:hidden">'
        f"{''.join(segments)}</div>"
        f'<div style="font-size:0.85em;margin-top:4px">{"".join(legend)}</div>'
        f'<div style="font-size:0.9em;margin-top:6px">Context held: {s["context_tokens"]:,} of '
        f"{s['capacity_tokens']:,} tokens (document {s['document_tokens']:,}, {conversation}) · {speed} · "
        f"updated {clock}</div>{resident}</div>"
    )


def head_map_html(engine: Engine) -> str:
    """Layers x KV heads, retrieval vs streaming, with each head's bytes at the current context length."""
    args, context = engine.args, engine.cache.seq_len
    mask, _ = engine.pattern.retrieval_mask(engine.settings.sparsity)
    cell = max(5, min(14, 420 // args.n_layers - 2))  # the whole model fits the column's width
    columns = []
    for layer in range(args.n_layers):
        # reorder_heads put the retrieval heads first, each group in original order
        original = [i for i, m in enumerate(mask[layer]) if m] + [
            i for i, m in enumerate(mask[layer]) if not m
        ]
        r_bytes, s_bytes = engine.cache.spec.head_bytes(layer, context)
        cells = []
        for slot in range(args.n_kv_heads):
            kind, colour, nbytes = (
                ("retrieval", RETRIEVAL_COLOUR, r_bytes)
                if slot < engine.retrieval_heads[layer]
                else ("streaming", STREAMING_COLOUR, s_bytes)
            )
            tip = (
                f"layer {layer}, slot {slot} (original KV head {original[slot]}): {kind} head, "
                f"{fmt_bytes(nbytes)} at {context:,} tokens"
            )
            cells.append(
                f'<div title="{tip}" style="width:{cell}px;height:{cell}px;background:{colour};'
                f'border-radius:2px;margin:1px"></div>'
            )
        columns.append(f'<div data-layer="{layer}">{"".join(cells)}</div>')
    grid = f'<div style="display:flex">{"".join(columns)}</div>'
    axis = f'<div style="font-size:10px">columns: layers 0 → {args.n_layers - 1}; rows: KV-head slots</div>'
    n_retrieval = sum(engine.retrieval_heads)
    n_total = args.n_layers * args.n_kv_heads
    per_layer = [engine.cache.spec.head_bytes(layer, context) for layer in range(args.n_layers)]
    r0, s0 = max(b[0] for b in per_layer), max(b[1] for b in per_layer)
    legend = (
        f'<div style="font-size:0.85em;margin-top:6px">'
        f'<span style="color:{RETRIEVAL_COLOUR}">■</span> retrieval heads: {n_retrieval} of {n_total}, '
        f"each {fmt_bytes(r0)} at {context:,} tokens (grows with the context) · "
        f'<span style="color:{STREAMING_COLOUR}">■</span> streaming heads: {n_total - n_retrieval}, '
        f"each {fmt_bytes(s0)} (sink {engine.cache_config.sink_tokens} + recent "
        f"{engine.cache_config.recent_tokens} tokens, fixed). Rows are KV-head slots after reordering: each "
        f"layer's retrieval heads come first; hover a cell for its original head.</div>"
    )
    return f'<div class="head-map" style="overflow-x:auto">{grid}{axis}{legend}</div>'


def provenance(engine: Engine) -> dict[str, Any]:
    """The settings that produced an answer, so an exported conversation can be reproduced and trusted."""
    s, doc = engine.stats(), engine.document
    return {
        "model": s["model"],
        "device": s["device"],
        "dtype": s["dtype"],
        "w8a8": s["w8a8"],
        "kv_bits": s["kv_bits"],
        "pattern": s["pattern"],
        "streaming_ratio": s["sparsity"],
        "sink_tokens": s["sink_tokens"],
        "recent_tokens": s["recent_tokens"],
        "document": {
            "title": doc.title,
            "tokens": doc.tokens,
            "token_sha256": doc.sha256,
            "loaded_by": doc.loaded_by,
        }
        if doc
        else None,
    }


def _settings_line(meta: dict[str, Any]) -> str:
    return (
        f"model {meta['model']} ({meta['dtype']}, {meta['device']}), W8A8 {'on' if meta['w8a8'] else 'off'}, "
        f"KV{meta['kv_bits']}, pattern {meta['pattern']} at {meta['streaming_ratio']:.0%} streaming heads "
        f"(sink {meta['sink_tokens']}, recent {meta['recent_tokens']})"
    )


def export_markdown(turns: Sequence[dict]) -> str:
    """The conversation for people; each turn names its document, and its settings where they changed."""
    meta = turns[0]["provenance"]
    doc = meta["document"]
    lines = [
        f"# Questions about {doc['title']}",
        "",
        f"- settings: {_settings_line(meta)}",
        f"- document: {doc['title']}, {doc['tokens']:,} tokens, token sha256 `{doc['token_sha256']}`, "
        f"loaded by {doc['loaded_by'] or '-'}",
        f"- exported: {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
    ]
    for turn in turns:
        lines += [f"## Q: {turn['question']}", "", turn["answer"] or "_(no answer)_", ""]
        if turn.get("passages"):
            lines += [passages_markdown(turn["passages"]), ""]
        note = f"{turn.get('ttft_s', 0.0):.2f} s to first token, {turn.get('decode_ms_per_token', 0.0):.0f} ms/token"
        note += f", {ENDINGS.get(turn.get('ended_by', ''), 'ended')}"
        if turn["provenance"] != meta:
            note += f"; {_settings_line(turn['provenance'])}"
        lines += [f"_{note}; document {turn['document_title']} (sha256 {turn['document_sha256'][:12]}…)_", ""]
    return "\n".join(lines)


def passages_markdown(passages: Sequence[dict]) -> str:
    """The passages an answer came from (``duo_qserve.evidence.describe``), as a short list under the answer,
    each labelled with what ranks them (``focus``), so the figures fall down the list; the heading says what it is
    in a few words."""
    lines = [
        "**Where this came from**, ranked by *focus* (a passage's share of the retrieval heads' attention to the "
        "book, sharp looks counting most):"
    ]
    for i, p in enumerate(passages, 1):
        where = f"{p['chapter']} · " if p["chapter"] else ""
        snippet = f": “{p['snippet']}”" if p["snippet"] else ""
        lines.append(
            f"{i}. {where}tokens {p['position']:,}–{p['position'] + p['tokens']:,} · "
            f"{p['focus']:.0%} focus{snippet}"
        )
    return "\n".join(lines)


def export_json(turns: Sequence[dict]) -> str:
    """The conversation for programs: every turn carries the full provenance of its answer."""
    return json.dumps(
        {"exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "turns": list(turns)}, indent=2, ensure_ascii=False
    )
