"""The text every tool reads, in one place: essays split by file, a Python-documentation haystack, passkey filler,
and the multi-passkey retrieval samples that pattern training and scoring both draw (``PasskeyRetrieval``).

Training (``train_patterns``), fast scoring (``score_patterns``), evaluation (``eval.niah``, ``eval.perplexity``)
and SmoothQuant calibration (``quant.cli``) all take their text from here, so they agree on which text is which;
above all, no evaluation ever reads the calibration text.

Essays: a directory of ``*.txt`` files (in development the Paul Graham essays of
``../shared/data/haystack/paul_graham_essays``, which users do not have). It is resolved from an explicit argument,
else the environment variable ``DUO_QSERVE_ESSAYS``; nothing is guessed, so a missing directory is a clear error and
never a silent switch to other text.

Splits, by file and deterministic: the files sorted by name; the last ``CALIBRATION_FILES`` of them are the
``calibration`` split (SmoothQuant statistics, nothing else; the statistics shipped for SmolLM2 in
``duo_qserve/quant/calibration/`` came from exactly these eight essays, vb.txt ... worked.txt); every other file is
the ``evaluation`` split, which training, scoring, NIAH and perplexity read. Training and scoring touch no weights,
so sharing text with the evaluations does not leak into what the evaluations measure; calibration does change the
weights, so its text is kept apart.

Pydocs: a second haystack of a different kind (technical reference text, full of code and signatures), built on the
fly from what every installation has: ``pydoc``'s plain-text rendering of ``PYDOC_MODULES``, fixed modules of the
standard library, rendered in a fresh interpreter, with the parts that vary between runs removed (module data
values, file paths, object addresses). It is the same for one Python version (results record the version), and
about 540K characters: more than 32K tokens at any tokenizer's rate.
"""

from __future__ import annotations

import functools
import random
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from duo_qserve import environment

CALIBRATION_FILES = 8
SPLITS = ("calibration", "evaluation")
# Modules whose documentation is mostly prose and signatures. Left out: modules whose rendering shows run-time
# state (logging's handlers, tempfile's tempdir, os.environ), which would make the text differ between runs.
PYDOC_MODULES = (
    "textwrap", "json", "argparse", "collections", "itertools", "functools", "pathlib", "datetime", "random",
    "statistics", "re", "csv", "heapq", "bisect", "shutil", "subprocess", "threading", "queue", "contextlib",
    "calendar", "difflib", "zipfile",
)  # fmt: skip
# The classic passkey-retrieval filler (Mohtashami & Jaggi, 2023): no content a needle could be confused with.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def essays_dir(path: str | Path | None = None) -> Path:
    """The essays directory: ``path`` if given, else ``$DUO_QSERVE_ESSAYS``; FileNotFoundError naming both if
    neither is set or the directory holds no ``*.txt`` file."""
    given = path if path is not None else environment.essays_dir()
    if not given:
        raise FileNotFoundError(
            f"no essays directory: pass one (--essays DIR) or set the environment variable {environment.ESSAYS} to a "
            "directory of *.txt essays"
        )
    d = Path(given).expanduser()
    if not any(d.glob("*.txt")):
        source = "given" if path is not None else f"from {environment.ESSAYS}"
        raise FileNotFoundError(f"no *.txt essays in {d} ({source})")
    return d


def essay_files(split: str, path: str | Path | None = None) -> list[Path]:
    """The files of one split (``"calibration"`` or ``"evaluation"``), sorted by name (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    d = essays_dir(path)
    files = sorted(d.glob("*.txt"))
    if len(files) <= CALIBRATION_FILES:
        raise FileNotFoundError(
            f"{d} has {len(files)} essays; the calibration split takes {CALIBRATION_FILES}, so at least "
            f"{CALIBRATION_FILES + 1} are needed"
        )
    return files[-CALIBRATION_FILES:] if split == "calibration" else files[:-CALIBRATION_FILES]


def read_texts(files: list[Path]) -> str:
    """The files' text, in order, separated by blank lines."""
    return "\n\n".join(f.read_text(errors="replace") for f in files)


def essay_text(split: str, path: str | Path | None = None) -> str:
    """Every essay of one split as one text."""
    return read_texts(essay_files(split, path))


_VOLATILE_SECTIONS = ("DATA", "FILE")  # module values (may be run-time state) and install paths
_SECTION = re.compile(r"^(?=[A-Z][A-Z ]*$)", re.M)  # pydoc's top-level headings: NAME, CLASSES, DATA, ...
# Rendered in a fresh, isolated interpreter: pydoc documents live objects, so whatever the calling process did
# would show (pytest replaces threading.excepthook; copying an object caches __slotnames__ on its class).
_RENDER = """
import importlib, pydoc, sys
for name in sys.argv[1:]:
    sys.stdout.write(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext) + "\\0")
"""


@functools.cache
def pydocs_text() -> str:
    """The Python-documentation haystack (see the module docstring); built once per process (about 1 s)."""
    out = subprocess.run(
        [sys.executable, "-I", "-X", "utf8", "-c", _RENDER, *PYDOC_MODULES],
        capture_output=True, encoding="utf-8", check=True,
    ).stdout  # fmt: skip
    parts = []
    for text in out.split("\0")[:-1]:
        sections = [s for s in _SECTION.split(text) if s.split("\n", 1)[0] not in _VOLATILE_SECTIONS]
        parts.append(re.sub(r" at 0x[0-9a-fA-F]+", "", "".join(sections)).rstrip())
    return "\n\n".join(parts)


# ---- passkey retrieval samples (pattern training and scoring) ---------------------------------------------
NATO = (
    "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa "
    "quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
).split()
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


class PasskeyRecipe(Protocol):
    """What a passkey sample is drawn by (``train_patterns.TrainSettings`` has these, among its other settings)."""

    context_length_min: int
    context_length_max: int
    context_lengths_num_intervals: int
    num_passkeys: int
    passkey_length: int
    min_needle_depth_ratio: float
    max_needle_depth_ratio: float
    depth_ratio_num_intervals: int


@dataclass
class Sample:
    ids: torch.Tensor  # [T] token ids
    supervised: torch.Tensor  # [T] bool: the question/answer tokens the loss looks at
    needle: (
        torch.Tensor
    )  # [T] bool: the tokens the answers must be retrieved from (the passkeys in the context)


SampleFn = Callable[[random.Random], Sample]


class PasskeyRetrieval:
    """Multi-passkey retrieval samples on real text: NATO-word passkeys at sorted random depths of a haystack slice,
    then one question and answer per passkey (supervised). The haystack is the evaluation split of ``essays`` (a
    directory; None: ``$DUO_QSERVE_ESSAYS``), never the calibration text."""

    def __init__(self, tokenizer, settings: PasskeyRecipe, essays: str | Path | None = None):
        self.tok, self.s = tokenizer, settings
        self.haystack = self._encode(essay_text("evaluation", essays))
        self.lengths = np.linspace(
            settings.context_length_min, settings.context_length_max, settings.context_lengths_num_intervals
        ).astype(int)
        self.depths = np.linspace(
            settings.min_needle_depth_ratio,
            settings.max_needle_depth_ratio,
            settings.depth_ratio_num_intervals,
        )
        bos = tokenizer.bos_token or ""
        self.prefix = self._encode(bos + "<|im_start|>user\nThis is a very long story book: <book> ")
        self.book_end = self._encode(" </book>.\n\n")

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def __call__(self, rng: random.Random) -> Sample:
        s = self.s
        n = int(rng.choice(list(self.lengths)))
        start = rng.randrange(len(self.haystack) - n)
        hay = self.haystack[start : start + n]
        keys = [" ".join(rng.choice(NATO) for _ in range(s.passkey_length)) for _ in range(s.num_passkeys)]
        depths = sorted(rng.sample(list(self.depths), s.num_passkeys))
        ids, needle, prev = list(self.prefix), [], 0
        for i, (key, depth) in enumerate(zip(keys, depths, strict=True)):
            cut = int(n * depth)
            ids += hay[prev:cut]
            ids += self._encode(
                f"\n\nRemember this sequence of words, it's the {ORDINALS[i]} passkey to the vault:"
            )
            key_ids = self._encode(f" {key}")
            needle.append((len(ids), len(ids) + len(key_ids)))
            ids += key_ids + self._encode("\n\n")
            prev = cut
        ids += hay[prev:] + self.book_end
        n_context = len(ids)
        for i, key in enumerate(keys):
            question = f"Based on the content of the book, what is the {ORDINALS[i]} passkey to the vault?\nPasskey: "
            ids += self._encode(question + key + "\n\n")
        supervised = torch.zeros(len(ids), dtype=torch.bool)
        supervised[n_context:] = True
        needle_mask = torch.zeros(len(ids), dtype=torch.bool)
        for start, end in needle:
            needle_mask[start:end] = True
        return Sample(torch.tensor(ids), supervised, needle_mask)
