"""The text every tool reads, in one place: essays split by file, a Python-documentation haystack, passkey filler.

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
import re
import subprocess
import sys
from pathlib import Path

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
