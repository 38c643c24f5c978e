"""Needle in a haystack: do the compressed configurations still find facts hidden in long documents?

A document is a slice of a haystack with one or two needles (facts with random answers) planted at depths; the
engine ingests it once and answers each needle's question against that one ingest. A question is found when its
answer holds the expected answer (scored by the needle's kind, below).

Needle kinds (``--kinds``, default all three):

- ``number``: a random 7-digit number ("The secret number is 4821377."); found when the answer holds those digits as
  one whole number (commas or spaces inside it allowed, so "4,821,377" counts and "48213770" does not);
- ``word``: a name or word drawn from a built-in list ("The name of the lighthouse keeper's cat is Ferdinand.");
  found when the answer holds it as a whole word, in any case;
- ``two-facts``: two needles of different templates at two depths of one document (the grid's depth, and the depth
  half the depth list away), each asked with its own question against the same ingest, each scored by its kind.

Several templates per kind; a document draws its template and answer from the seed, so keys are random but the same
for every configuration and every run.

Needles from a file (``--needles FILE.jsonl``) replace the built-in ones: one JSON object per line, blank lines
skipped::

    {"kind": "word", "needle": "The name of the lighthouse keeper's cat is {answer}.",
     "question": "What is the name of the lighthouse keeper's cat?", "answers": ["Ferdinand", "Mortimer"]}
    {"kind": "number", "needle": "The code of the safe is {answer}.", "question": "What is the code of the safe?"}

``kind`` is ``number`` or ``word`` (how answers are scored); ``needle`` holds ``{answer}`` exactly once;
``question`` is asked after the document; ``answers`` lists the answers a document draws one from (required for
words; numbers without it draw random 7-digit numbers; a number's answers must be digits). Kind ``number`` uses the
file's number needles, ``word`` its word needles, ``two-facts`` any two of them. Pick answers that do not occur in
the haystack (the built-in ones occur in neither built-in haystack; a test checks it).

Haystacks (``--haystack``, repeatable; default ``essays`` and ``pydocs``): the built-ins ``essays`` (the essays'
evaluation split, ``duo_qserve.data``), ``pydocs`` (the Python documentation, built on the fly) and ``filler`` (the
passkey filler), or ``NAME=PATH``: a text file, or every ``*.txt`` and ``*.md`` file of a directory, sorted. Each
document starts at a random sentence of its haystack (wrapping around to its beginning when short).

Grid: lengths x depths x kinds x haystacks, repeated ``--trials`` times. A length is the tokens the model sees when
it answers: the document in the chat template plus the (longest) question. A depth is the percent of the haystack
slice before the needle, moved back to the start of its sentence (at most ``BACKOFF`` tokens).

Configurations (``--configs``, default all; 16-bit means fp16 on CUDA, fp32 on CPU; every one the same sink/recent
and pre-fill chunk, so only what the name says differs): ``CONFIGS`` below. The trained pattern is ``--pattern``
(default ``attn_patterns/<model directory>/``); the random one is drawn for the model's shape.

A run builds every configuration's engine once, then loops over trials outside and configurations inside (for each
document), so all configurations answer the same documents; ``--deadline SECONDS`` stops before a document that
would end past it, and a run cut short still compares the configurations on the same documents (a trial's documents
come in a seeded random order, so a partial trial still spreads over the grid). The results file is rewritten
atomically every ``SAVE_SECONDS`` and at the end (also after an error).

``--evidence``: each answer also gets its passages (``duo_qserve.evidence``), and every rate gains ``top_passage``,
the fraction of found answers whose top passage holds the whole needle (issue #24's target: 0.9), shown as a column
of the markdown table.

Results: ``<out-dir>/niah-<name>-<date>.json`` (device, date, commit, command, model, grid, progress; per
configuration the fraction found with its Wilson 95% interval, breakdowns per kind, haystack and length, a depth x
length table and every question's record) plus a heat map PNG per configuration; at the end a README-ready markdown
table is printed (and stored in the file).

Run (GPU, a 32K-context model): ``python -m duo_qserve.eval.niah --model qwen2.5-coder-1.5b --device cuda
--lengths 4096,8192,16384,24576,32768 --trials 2 --deadline 540``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from duo_qserve import data
from duo_qserve.environment import REPO_ROOT
from duo_qserve.eval.common import result_header, write_json
from duo_qserve.evidence import passage_text
from duo_qserve.sampling import Sampling

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
KINDS = ("number", "word", "two-facts")
BACKOFF = 100  # tokens a needle may move back to reach the start of a sentence
SAVE_SECONDS = 60.0
MAX_NEW_TOKENS = 24  # answers are short: a number, a name
SAMPLINGS = {"default": {}, "greedy": vars(Sampling.greedy())}  # --sampling: the engine's defaults, or greedy


# ---- needles ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needle:
    """A fact template: ``template`` holds ``{answer}``; ``kind`` says how answers are scored."""

    kind: str  # "number" or "word"
    template: str
    question: str
    answers: tuple[str, ...] = ()  # a document draws one; empty (numbers only): a random 7-digit number

    def draw(self, rng: random.Random) -> str:
        return rng.choice(self.answers) if self.answers else str(rng.randrange(10**6, 10**7))


NAMES = (
    "Ferdinand", "Mortimer", "Beatrix", "Cornelius", "Winifred", "Leopold", "Octavia", "Barnaby", "Ignatius",
    "Philippa", "Thaddeus", "Rosalind", "Percival", "Clementine", "Augustin", "Seraphina", "Bartholomew",
    "Genevieve", "Archibald", "Henrietta", "Lysander", "Marguerite", "Evander", "Isadora",
)  # fmt: skip
SPICES = (
    "saffron", "cardamom", "tamarind", "fenugreek", "sumac", "juniper", "sorrel", "tarragon", "lemongrass",
    "galangal", "chervil", "lovage", "nutmeg", "allspice", "caraway", "anise",
)  # fmt: skip
PASSWORDS = (
    "marmalade", "tangerine", "periwinkle", "buttercup", "gooseberry", "huckleberry", "snapdragon", "marigold",
    "pumpernickel", "butterscotch", "dragonfruit", "hollyhock", "kumquat", "nightingale", "quince", "rhubarb",
)  # fmt: skip
BUILTIN_NEEDLES = (
    Needle("number", "The secret number is {answer}.", "According to the document, what is the secret number?"),
    Needle(
        "number", "The combination of the museum's safe is {answer}.",
        "According to the document, what is the combination of the museum's safe?",
    ),
    Needle(
        "number", "The special magic number for the Lisbon archive is {answer}.",
        "According to the document, what is the special magic number for the Lisbon archive?",
    ),
    Needle(
        "word", "The name of the lighthouse keeper's cat is {answer}.",
        "According to the document, what is the name of the lighthouse keeper's cat?", NAMES,
    ),
    Needle(
        "word", "The ship that carried the first expedition to the northern islands was called the {answer}.",
        "According to the document, what was the ship that carried the first expedition to the northern islands "
        "called?", NAMES,
    ),
    Needle(
        "word", "The secret ingredient in Grandma Odile's soup is {answer}.",
        "According to the document, what is the secret ingredient in Grandma Odile's soup?", SPICES,
    ),
    Needle(
        "word", "The password to the old observatory is {answer}.",
        "According to the document, what is the password to the old observatory?", PASSWORDS,
    ),
)  # fmt: skip


class NeedleFileError(ValueError):
    """A needles file that cannot be used; the message names the file and line."""


def load_needles(path: str | Path) -> list[Needle]:
    """The needles of a JSONL file (format in the module docstring); NeedleFileError for anything wrong."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise NeedleFileError(f"{path}: cannot be read ({e})") from None
    needles = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise NeedleFileError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise NeedleFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = set(obj) - {"kind", "needle", "question", "answers"}
        if unknown:
            raise NeedleFileError(f"{where}: unknown field(s) {sorted(unknown)}")
        kind, needle, question = obj.get("kind"), obj.get("needle"), obj.get("question")
        answers = obj.get("answers", [])
        if kind not in ("number", "word"):
            raise NeedleFileError(f"{where}: kind must be 'number' or 'word', got {kind!r}")
        if not isinstance(needle, str) or needle.count("{answer}") != 1:
            raise NeedleFileError(f"{where}: needle must be a string holding {{answer}} exactly once")
        try:
            needle.format(answer="x")
        except (KeyError, IndexError, ValueError):
            raise NeedleFileError(
                f"{where}: needle has braces other than {{answer}} (write {{{{ }}}})"
            ) from None
        if not isinstance(question, str) or not question.strip():
            raise NeedleFileError(f"{where}: question must be a non-empty string")
        if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip() for a in answers):
            raise NeedleFileError(f"{where}: answers must be a list of non-empty strings")
        if kind == "word" and not answers:
            raise NeedleFileError(f"{where}: a word needle needs answers")
        if kind == "number" and not all(a.isdigit() for a in answers):
            raise NeedleFileError(f"{where}: a number needle's answers must be digits only")
        needles.append(Needle(kind, needle, question.strip(), tuple(a.strip() for a in answers)))
    if not needles:
        raise NeedleFileError(f"{path}: no needles")
    return needles


def needle_pools(needles: Sequence[Needle], kinds: Sequence[str]) -> dict[str, list[Needle]]:
    """The needles each document kind draws from; ValueError when a kind has too few."""
    pools = {"number": [], "word": [], "two-facts": list(needles)}
    for n in needles:
        pools[n.kind].append(n)
    for kind in kinds:
        if len(pools[kind]) < (2 if kind == "two-facts" else 1):
            need = "two needles" if kind == "two-facts" else f"a {kind} needle"
            raise ValueError(f"kind {kind!r} needs {need}, and the needles given have none")
    return {k: pools[k] for k in kinds}


# ---- scoring ---------------------------------------------------------------------------------------------------
def found_number(answer: str, key: str) -> bool:
    """The key's digits as one whole number in the answer (commas/spaces inside it allowed)."""
    numbers = re.findall(r"\d[\d,\s]*\d|\d", answer)
    return any(re.sub(r"[,\s]", "", n) == key for n in numbers)


def found_word(answer: str, word: str) -> bool:
    """The word (or words) as a whole word in the answer, in any case."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", answer, re.IGNORECASE) is not None


def found(kind: str, answer: str, expected: str) -> bool:
    return found_number(answer, expected) if kind == "number" else found_word(answer, expected)


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials (95% by default): unlike p +- z*se it stays inside [0, 1]
    and is sound at 0 or n successes, which retrieval scores often are."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, center - half), min(1.0, center + half))


# ---- haystacks and documents -----------------------------------------------------------------------------------
def haystack_text(spec: str, essays: str | None = None) -> tuple[str, str, str]:
    """(name, source, text) of ``--haystack SPEC``: a built-in name or NAME=PATH (file, or a directory's *.txt/*.md)."""
    if spec == "essays":
        return (
            spec,
            f"essays, evaluation split of {data.essays_dir(essays)}",
            data.essay_text("evaluation", essays),
        )
    if spec == "pydocs":
        return spec, f"pydoc of {len(data.PYDOC_MODULES)} stdlib modules", data.pydocs_text()
    if spec == "filler":
        return spec, "passkey filler", data.PASSKEY_FILLER * 2000
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--haystack {spec!r}: expected essays, pydocs, filler or NAME=PATH")
    p = Path(path).expanduser()
    files = sorted(f for f in p.iterdir() if f.suffix in (".txt", ".md")) if p.is_dir() else [p]
    if not all(f.is_file() for f in files) or not files:
        raise ValueError(f"--haystack {spec!r}: {p} is no text file nor a directory with *.txt or *.md files")
    text = data.read_texts(files)
    if not text.strip():
        raise ValueError(f"--haystack {spec!r}: {p} holds no text")
    return name, str(p), text


def _ends_sentence(piece: str) -> bool:
    return "\n" in piece or piece.rstrip().endswith((".", "!", "?"))


class Haystack:
    """A haystack's tokens and where its sentences start: a needle goes at the start of a sentence."""

    def __init__(self, name: str, text: str, tokenizer, source: str = ""):
        self.name, self.source = name, source or name
        self.ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
        ends = {int(i) for i in np.unique(self.ids) if _ends_sentence(tokenizer.decode([int(i)]))}
        after_end = np.isin(np.roll(self.ids, 1), list(ends))
        after_end[0] = True
        self.starts = after_end  # [T] bool: a sentence starts at token i
        self.start_positions = np.flatnonzero(after_end)

    def take(self, rng: random.Random, n: int) -> tuple[list[int], np.ndarray]:
        """``n`` tokens from a random sentence start (wrapping around), and their sentence-start flags."""
        idx = (int(rng.choice(self.start_positions)) + np.arange(n)) % len(self.ids)
        return self.ids[idx].tolist(), self.starts[idx]


def needle_position(starts: np.ndarray, depth: float) -> int:
    """Where a needle at ``depth`` percent goes: that token, moved back to the start of its sentence when one is at
    most BACKOFF tokens before (the end of the slice counts as a start)."""
    n = len(starts)
    target = int(n * depth / 100)
    for at in range(target, max(target - BACKOFF, 0) - 1, -1):
        if at == n or starts[at]:
            return at
    return target


def plant(
    hay: list[int], needles: Sequence[list[int]], positions: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Insert each needle's ids at its haystack position; returns the ids and where each needle starts in them."""
    order = sorted(range(len(needles)), key=lambda i: positions[i])
    ids, starts, prev = [], [0] * len(needles), 0
    for i in order:
        ids += hay[prev : positions[i]]
        starts[i] = len(ids)
        ids += needles[i]
        prev = positions[i]
    return ids + hay[prev:], starts


@dataclass
class Fact:
    kind: str  # how the answer is scored
    needle: str
    question: str
    answer: str
    depth: float


@dataclass
class Document:
    trial: int
    haystack: str
    kind: str  # number, word or two-facts
    length: int
    depth: float
    text: str
    facts: list[Fact]


@dataclass
class Grid:
    lengths: list[int]
    depths: list[float]  # percent of the haystack slice before the needle
    kinds: list[str]
    trials: int = 1
    seed: int = 0

    def second_depth(self, depth: float) -> float:
        """The two-facts document's other depth: half the depth list away (wrapping), so both are grid depths."""
        i = self.depths.index(depth)
        return self.depths[(i + len(self.depths) // 2) % len(self.depths)]


def make_document(
    engine, haystack: Haystack, pool: Sequence[Needle], grid: Grid, trial: int, kind: str, length: int,
    depth: float,
) -> Document:  # fmt: skip
    """One document of the grid, drawn from the seed and the cell alone (the same in every run)."""
    rng = random.Random(f"{grid.seed}/{trial}/{haystack.name}/{kind}/{length}/{depth}")
    needles = rng.sample(list(pool), 2) if kind == "two-facts" else [rng.choice(pool)]
    depths = [depth, grid.second_depth(depth)][: len(needles)]
    facts = []
    for needle, d in zip(needles, depths, strict=True):
        answer = needle.draw(rng)
        while any(f.answer == answer for f in facts) and len(needle.answers) != 1:  # two facts, two answers
            answer = needle.draw(rng)
        facts.append(Fact(needle.kind, needle.template.format(answer=answer), needle.question, answer, d))
    needle_ids = [engine.encode(" " + f.needle) for f in facts]
    overhead = len(engine.document_ids("")) + max(len(engine.question_ids(f.question)) for f in facts)
    n_hay = length - overhead - sum(map(len, needle_ids))
    if n_hay <= 0:
        raise ValueError(f"context length {length} leaves no room for a haystack")
    hay, starts = haystack.take(rng, n_hay)
    ids, _ = plant(hay, needle_ids, [needle_position(starts, f.depth) for f in facts])
    return Document(trial, haystack.name, kind, length, depth, engine.tokenizer.decode(ids), facts)


def trial_documents(
    engine, haystacks: Sequence[Haystack], pools: dict, grid: Grid, trial: int
) -> list[Document]:
    """Every cell of the grid once, in an order shuffled by the seed and the trial."""
    cells = [(h, k, n, d) for h in haystacks for k in grid.kinds for n in grid.lengths for d in grid.depths]
    random.Random(f"{grid.seed}/{trial}/order").shuffle(cells)
    return [make_document(engine, h, pools[k], grid, trial, k, n, d) for h, k, n, d in cells]


def short_answer(
    engine, question: str, max_new_tokens: int = MAX_NEW_TOKENS, sampling: dict | None = None,
    evidence: bool = False,
) -> str:  # fmt: skip
    """The answer's first line: the stream is closed once a line ends after some text, so a model that opens with
    a blank line still answers, and one that goes on after its answer costs no more tokens. ``sampling``: the
    engine's sampling parameters (``SAMPLINGS``; none: its defaults); ``evidence``: the engine finds the answer's
    passages (``engine.last.evidence``) once the stream is closed."""
    text = ""
    with contextlib.closing(
        engine.ask(question, max_new_tokens=max_new_tokens, evidence=evidence, **(sampling or {}))
    ) as pieces:
        for piece in pieces:
            text += piece
            if "\n" in text.lstrip():
                break
    return text.strip().split("\n")[0]


def ask_document(
    engine, doc: Document, max_new_tokens: int = MAX_NEW_TOKENS, sampling: dict | None = None,
    evidence: bool = False,
) -> list[dict]:  # fmt: skip
    """Ingest the document once and ask each of its questions: one record per question. With ``evidence`` a
    record also says whether the answer's top passage (``duo_qserve.evidence``) holds the whole needle
    (``top_passage_has_needle``) and how long finding the passages took."""
    t0 = time.perf_counter()
    info = engine.ingest(doc.text)
    ingest_s = time.perf_counter() - t0
    records = []
    for fact in doc.facts:
        t1 = time.perf_counter()
        answer = short_answer(engine, fact.question, max_new_tokens, sampling, evidence)
        extra = {}
        if evidence:
            top = engine.last.evidence[:1]
            extra = dict(
                top_passage_has_needle=bool(top)
                and fact.needle in passage_text(top[0], info.ids, engine.tokenizer),
                evidence_s=round(engine.last.evidence_s, 3),
            )
        records.append(
            dict(trial=doc.trial, haystack=doc.haystack, kind=doc.kind, length=doc.length, depth=fact.depth,
                 tokens=info.tokens + len(engine.question_ids(fact.question)), needle=fact.needle,
                 question=fact.question, expected=fact.answer, answer=answer,
                 found=found(fact.kind, answer, fact.answer), ingest_s=round(ingest_s, 3),
                 answer_s=round(time.perf_counter() - t1, 3), **extra)
        )  # fmt: skip
    return records


@dataclass
class Progress:
    records: dict[str, list[dict]]  # per configuration, in the order answered
    documents: int = 0
    trials_completed: int = 0
    stopped: str = "running"  # running, finished, deadline, or error: ...
    seconds_per_token: float = 0.0  # the slowest document so far, per token, over all configurations

    @classmethod
    def start(cls, names: Sequence[str]) -> Progress:
        return cls({name: [] for name in names})


def run(
    engines: dict, haystacks: Sequence[Haystack], pools: dict, grid: Grid, progress: Progress,
    deadline: float | None = None, max_new_tokens: int = MAX_NEW_TOKENS, save: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = print, sampling: dict | None = None, evidence: bool = False,
) -> Progress:  # fmt: skip
    """The grid on every engine: trials outside, configurations inside each document (see the module docstring).
    ``deadline`` is a ``time.monotonic()`` instant; ``save`` is called every SAVE_SECONDS."""
    first = next(iter(engines.values()))  # one model, so one tokenizer and template for every configuration
    last_save = time.monotonic()
    for trial in range(grid.trials):
        docs = trial_documents(first, haystacks, pools, grid, trial)
        for i, doc in enumerate(docs):
            if deadline is not None and time.monotonic() + progress.seconds_per_token * doc.length > deadline:
                progress.stopped = "deadline"
                log(f"deadline: stopping after {progress.documents} documents ({trial} full trials)")
                return progress
            t0 = time.perf_counter()
            hits = []
            for name, engine in engines.items():
                records = ask_document(engine, doc, max_new_tokens, sampling, evidence)
                progress.records[name] += records
                hits.append(f"{name} {sum(r['found'] for r in records)}/{len(records)}")
            seconds = time.perf_counter() - t0
            progress.seconds_per_token = max(progress.seconds_per_token, seconds / doc.length)
            progress.documents += 1
            log(f"trial {trial} doc {i + 1}/{len(docs)} {doc.haystack} {doc.kind} {doc.length} "
                f"{doc.depth:g}%: {', '.join(hits)} ({seconds:.1f} s)")  # fmt: skip
            if time.monotonic() - last_save >= SAVE_SECONDS:
                save()
                last_save = time.monotonic()
        progress.trials_completed = trial + 1
    progress.stopped = "finished"
    return progress


# ---- summaries -------------------------------------------------------------------------------------------------
def rate(records: Sequence[dict]) -> dict:
    """Found, with its 95% interval; with evidence (``--evidence``), also ``top_passage``: the fraction of the
    found answers whose top passage holds the needle."""
    k, n = sum(r["found"] for r in records), len(records)
    out = dict(found=k / n if n else math.nan, questions=n, ci95=list(wilson(k, n)))
    right = [r for r in records if r["found"] and "top_passage_has_needle" in r]
    if right:
        out["top_passage"] = sum(r["top_passage_has_needle"] for r in right) / len(right)
    return out


def summarize(records: Sequence[dict], grid: Grid) -> dict:
    """Found (with its 95% interval) overall and per kind, haystack and length, and the [depths, lengths] table."""

    def by(key: str) -> dict:
        return {
            str(v): rate([r for r in records if r[key] == v]) for v in dict.fromkeys(r[key] for r in records)
        }

    table = [[rate([r for r in records if r["depth"] == d and r["length"] == n])["found"] for n in grid.lengths]
             for d in grid.depths]  # fmt: skip
    return rate(records) | dict(
        by_kind=by("kind"), by_haystack=by("haystack"), by_length=by("length"), table=table
    )


def heat_map(table: Sequence[Sequence[float]], grid: Grid, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.ma.masked_invalid(np.asarray(table, dtype=float))  # cells not reached (a deadline) stay blank
    fig, ax = plt.subplots(figsize=(1.2 * len(grid.lengths) + 2.5, 0.5 * len(grid.depths) + 2))
    im = ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(grid.lengths)), [str(n) for n in grid.lengths])
    ax.set_yticks(range(len(grid.depths)), [f"{d:g}" for d in grid.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(configs: Sequence[dict], grid: Grid) -> str:
    """configuration | found | 95% CI | one column per length."""
    head = [
        "configuration",
        "found",
        "95% CI",
        *(["top passage holds the needle (of found)"] if any("top_passage" in c for c in configs) else []),
        *(f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in grid.lengths),
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in configs:
        lo, hi = c["ci95"]
        cells = [f"{c['name']} ({c['description']})", f"{c['found']:.2f}", f"{lo:.2f}-{hi:.2f}"]
        if any("top_passage" in c for c in configs):
            cells.append(f"{c['top_passage']:.2f}" if "top_passage" in c else "-")
        cells += [
            f"{c['by_length'][str(n)]['found']:.2f}" if str(n) in c["by_length"] else "-"
            for n in grid.lengths
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---- configurations --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    description: str
    kv_bits: int
    w8a8: bool
    pattern: str | None = None  # None: every head a retrieval head; "trained" (--pattern) or "random"
    sparsity: float = 0.0


CONFIGS = {
    "full16": Config("full attention, 16-bit weights and KV", 16, False),
    "w8a8-kv16": Config("W8A8 weights, 16-bit KV, every head a retrieval head", 16, True),
    "kv4": Config("KV4, 16-bit weights, every head a retrieval head", 4, False),
    "w8a8kv4": Config("W8A8KV4, every head a retrieval head", 4, True),
    "duo50": Config("trained pattern, 50% streaming heads, KV4, 16-bit weights", 4, False, "trained", 0.5),
    "duo75": Config("trained pattern, 75% streaming heads, KV4, 16-bit weights", 4, False, "trained", 0.75),
    "duo50-w8a8": Config("trained pattern, 50% streaming heads, W8A8KV4", 4, True, "trained", 0.5),
    "duo75-w8a8": Config("trained pattern, 75% streaming heads, W8A8KV4", 4, True, "trained", 0.75),
    "random50": Config("random pattern, 50% streaming heads, KV4, 16-bit weights", 4, False, "random", 0.5),
}


def build_engine(loaded, cfg: Config, trained: str, scratch: Path, settings: dict):
    """One configuration's engine on ``loaded``, a copy of the model of its own (the engine reorders heads and
    quantizes in place). ``settings``: the EngineSettings every configuration shares (device, sink, ...)."""
    from duo_qserve.engine import Engine, EngineSettings
    from duo_qserve.patterns import random_pattern, save_pattern

    pattern = None
    if cfg.pattern == "trained":
        if not Path(trained).is_dir():
            raise FileNotFoundError(f"no trained pattern at {trained} (train one, or pass --pattern DIR)")
        pattern = trained
    elif cfg.pattern == "random":
        pattern = str(save_pattern(scratch / "random-pattern", random_pattern(loaded.model.args, seed=0).gates,
                                   {"source": "patterns.random_pattern(seed=0)"}))  # fmt: skip
    return Engine(loaded, EngineSettings(model=loaded.source, pattern=pattern, sparsity=cfg.sparsity,
                                         kv_bits=cfg.kv_bits, w8a8=cfg.w8a8, **settings))  # fmt: skip


def engine_record(engine) -> dict:
    s = engine.stats()
    keys = ("dtype", "w8a8", "smoothquant", "rotated", "kv_bits", "key_group", "pattern", "sparsity", "retrieval_heads",
            "sink_tokens", "recent_tokens")  # fmt: skip
    return {k: s[k] for k in keys} | {"chunk_size": engine.chunk_size}


def sink_recent(args: argparse.Namespace, trained: str) -> tuple[int, int]:
    """--sink/--recent, else the windows the trained pattern is served with, else the engine's defaults: every
    configuration gets the same, so the random pattern is served exactly as the trained one."""
    from duo_qserve.patterns import AttentionPattern, load_pattern

    pattern = load_pattern(trained) if Path(trained).is_dir() else AttentionPattern(np.ones((1, 1)))
    return (args.sink if args.sink is not None else pattern.sink_size,
            args.recent if args.recent is not None else pattern.recent_size)  # fmt: skip


def results(header: dict, engines: dict, progress: Progress, grid: Grid, out: Path, seconds: float) -> dict:
    """The results file's content: the header, progress, and per configuration its summary and records."""
    configs = []
    for name, engine in engines.items():
        summary = summarize(progress.records[name], grid)
        configs.append(dict(name=name, description=CONFIGS[name].description, engine=engine_record(engine),
                            heat_map=f"{out.stem}-{name}.png", **summary, records=progress.records[name]))  # fmt: skip
    progress_info = dict(stopped=progress.stopped, trials_completed=progress.trials_completed,
                         documents=progress.documents, seconds=round(seconds, 1))  # fmt: skip
    return header | dict(
        progress=progress_info, configurations=configs, table_markdown=markdown_table(configs, grid)
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m duo_qserve.eval.niah", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default="default", help="a named model, a checkpoint directory or a .gguf file")
    add("--name", default=None, help="results file niah-<name>-<date>.json (default: the model's name)")
    add("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    add("--lengths", default="1024,2048,4096", help="context lengths in tokens, comma-separated")
    add("--depths", default="10,30,50,70,90", help="needle depths in percent, comma-separated")
    add("--kinds", default=",".join(KINDS), help=f"needle kinds, comma-separated, of: {', '.join(KINDS)}")
    add("--haystack", action="append", default=None, metavar="NAME|NAME=PATH",
        help="essays, pydocs, filler, or NAME=PATH (a file or directory); repeatable (default: essays, pydocs)")  # fmt: skip
    add("--needles", default=None, metavar="FILE.jsonl", help="needles file instead of the built-in needles")
    add("--essays", default=None, help="essays directory (default: $DUO_QSERVE_ESSAYS)")
    add("--trials", type=int, default=1, help="times the whole grid runs")
    add("--seed", type=int, default=0)
    add("--pattern", default=None, help="trained pattern (default: attn_patterns/<model directory>/)")
    add("--sink", type=int, default=None, help="default: the trained pattern's deployed sink")
    add("--recent", type=int, default=None, help="default: the trained pattern's deployed recent window")
    add("--chunk-size", type=int, default=256,
        help="pre-fill chunk; small, so streaming heads really drop context during pre-fill")  # fmt: skip
    add(
        "--key-group", type=int, default=128, help="tokens per per-channel key scale, every KV4 configuration"
    )
    add("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    add("--sampling", choices=tuple(SAMPLINGS), default="default",
        help="default: the engine's chat defaults (repetition penalty, repeat stop); greedy: plain greedy decoding")  # fmt: skip
    add("--evidence", action="store_true",
        help="also find each answer's passages (duo_qserve.evidence) and report how often the top one holds the "
             "needle when the answer is right")  # fmt: skip
    add("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
        help="16-bit configurations' dtype (default: float16 on CUDA, float32 on CPU)")  # fmt: skip
    add("--deadline", type=float, default=None, metavar="SECONDS",
        help="stop cleanly (results written) before a document that would end later than this")  # fmt: skip
    add("--out-dir", default=str(RESULTS_DIR))
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, checked, with the grid, the needle pools and the haystack texts (read now, so a bad file
    fails before any model loads)."""
    p = build_parser()
    a = p.parse_args(argv)
    a.configs, a.kinds = a.configs.split(","), a.kinds.split(",")
    if unknown := [n for n in a.configs if n not in CONFIGS]:
        p.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    if unknown := [k for k in a.kinds if k not in KINDS]:
        p.error(f"--kinds: unknown {unknown}; known: {', '.join(KINDS)}")
    a.grid = Grid([int(x) for x in a.lengths.split(",")], [float(x) for x in a.depths.split(",")], a.kinds,
                  a.trials, a.seed)  # fmt: skip
    try:
        a.pools = needle_pools(load_needles(a.needles) if a.needles else BUILTIN_NEEDLES, a.kinds)
        a.texts = [haystack_text(spec, a.essays) for spec in a.haystack or ["essays", "pydocs"]]
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return a


def main(argv: list[str] | None = None) -> int:
    t_start = time.monotonic()
    a = parse_args(argv)
    import torch

    from duo_qserve.engine import ANSWER_RESERVE, PATTERNS_DIR
    from duo_qserve.loading import load_model
    from duo_qserve.models import named_model

    grid = a.grid
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, a.dtype) if a.dtype else None
    loaded = load_model(a.model, device, dtype)
    trained = a.pattern or str(PATTERNS_DIR / loaded.name)
    sink, recent = sink_recent(a, trained)
    settings = dict(device=device, dtype=dtype, sink=sink, recent=recent, chunk_size=a.chunk_size,
                    key_group=a.key_group, max_tokens=max(grid.lengths) + ANSWER_RESERVE + 256)  # fmt: skip
    engines = {}
    with tempfile.TemporaryDirectory() as scratch:
        for i, n in enumerate(a.configs):
            print(f"building {n}: {CONFIGS[n].description}", flush=True)
            copy = loaded if i == 0 else load_model(a.model, device, dtype)
            engines[n] = build_engine(copy, CONFIGS[n], trained, Path(scratch), settings)
    tokenizer = loaded.tokenizer
    haystacks = [Haystack(name, text, tokenizer, source) for name, source, text in a.texts]

    named = named_model(a.model)
    name = a.name or (named.name if named else Path(a.model).stem)
    header = result_header("duo_qserve.eval.niah", argv, device) | dict(
        model=loaded.name, name=name,
        grid=dict(lengths=grid.lengths, depths=grid.depths, kinds=grid.kinds, trials=grid.trials, seed=grid.seed,
                  haystacks={h.name: dict(source=h.source, tokens=len(h.ids)) for h in haystacks},
                  needles=a.needles or "built-in", max_new_tokens=a.max_new_tokens, sampling=a.sampling,
                  evidence=a.evidence),
        scoring="number: the digits as one whole number in the answer; word: a case-insensitive whole-word "
                "match; found: the fraction of questions found (a two-facts document asks two)",
    )  # fmt: skip
    out = Path(a.out_dir) / f"niah-{name}-{header['date']}.json"
    progress = Progress.start(a.configs)

    def save() -> None:
        write_json(out, results(header, engines, progress, grid, out, time.monotonic() - t_start))

    deadline = t_start + a.deadline if a.deadline is not None else None
    try:
        run(engines, haystacks, a.pools, grid, progress, deadline=deadline, max_new_tokens=a.max_new_tokens,
            sampling=SAMPLINGS[a.sampling], evidence=a.evidence,
            save=save, log=lambda m: print(m, flush=True))  # fmt: skip
    except BaseException as e:
        progress.stopped = f"error: {type(e).__name__}: {e}"
        raise
    finally:
        final = results(header, engines, progress, grid, out, time.monotonic() - t_start)
        write_json(out, final)
        for c in final["configurations"]:
            title = f"NIAH {loaded.name} / {c['name']}: {c['found']:.2f} found\n{c['description']}"
            heat_map(c["table"], grid, title, out.with_name(c["heat_map"]))
        print(final["table_markdown"])
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
