"""Every command the README and docs show, checked against the code, so examples cannot drift.

Commands are taken from the ```bash blocks of README.md, docs/*.md, benchmarks/README.md and models/README.md:
scripts must exist (and run_demo.sh's flags parse with the app's own parser), ``python -m duo_qserve ...`` lines
must parse with the real command line (a synopsis with ``[...]`` must name only options that exist), modules
named with ``python -m`` must exist, and parse with the module's own ``build_parser()`` where it has one. The
capacity table is recomputed cell by cell, and ``ask`` runs as users type it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import re
import shlex

import pytest
from conftest import UPSTREAM_PATTERNS, haystack_text

from app.main import parse_args as app_args
from duo_qserve.__main__ import build_parser
from duo_qserve.__main__ import main as cli
from duo_qserve.environment import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "benchmarks" / "README.md", REPO_ROOT / "models" / "README.md"]
DOCS += sorted((REPO_ROOT / "docs").glob("*.md"))
PATTERN_4194K = UPSTREAM_PATTERNS / "Llama-3-8B-Instruct-Gradient-4194k"


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command) for each command line of each bash block; continuations joined, comments dropped."""
    found = []
    for doc in DOCS:
        if not doc.is_file():
            continue
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #", 1)[0].strip()
                for command in line.split("&&"):
                    if command.strip() and not command.strip().startswith("#"):
                        found.append((doc.name, command.strip()))
    return found


COMMANDS = documented_commands()


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 5 and any("run_demo.sh" in c for _, c in COMMANDS)


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:50]}" for d, c in COMMANDS])
def test_documented_command_matches_the_code(doc, command):
    words = shlex.split(command)
    if words[0] == "torchrun":  # its own options, then the module it runs in every process
        assert "-m" in words, f"{doc}: torchrun runs a module here (-m MODULE): {command}"
        words = ["python", *words[words.index("-m") :]]
        command = " ".join(words)
    if words[0] == "bash":
        assert (REPO_ROOT / words[1]).is_file(), f"{doc}: {words[1]} does not exist"
        if words[1] == "scripts/run_demo.sh":
            app_args(words[2:])  # exits (fails the test) on an unknown flag
        return
    assert words[:2] == ["python", "-m"], f"{doc}: not a command this test knows: {command}"
    module, rest = words[2], words[3:]
    if module != "duo_qserve":
        assert importlib.util.find_spec(module) is not None, f"{doc}: no module {module}"
        build = getattr(importlib.import_module(module), "build_parser", None)
        if build is None:
            return
        parser = build()  # a module with its own command line (e.g. duo_qserve.eval.niah)
        if "[" in command or "..." in command:
            for word in re.findall(r"--[a-z0-9-]+", command):
                assert word in parser._option_string_actions, f"{doc}: {module} has no option {word}"
        else:
            parser.parse_args(rest)
        return
    if "[" in command or "..." in command:  # a synopsis: the sub-command and every option it names exist
        options = _subparser(rest[0])._option_string_actions
        for word in re.findall(r"--[a-z0-9-]+", command):
            assert word in options, f"{doc}: `{rest[0]}` has no option {word}"
        return
    if rest[0] in ("quantize", "patterns"):  # forwarded to their own modules' parsers
        build_parser().parse_args(rest)
        return
    build_parser().parse_args(rest)  # exits (fails the test) on anything the command line does not take


def _plan_tokens(*args: str) -> int:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(["plan", "--model", "llama-3-8b", "--json", *args]) == 0
    return json.loads(out.getvalue())["max_tokens"]


def test_capacity_table_is_what_the_planner_computes():
    """Each cell of the README's capacity table, with the settings the README names beside it."""
    if not PATTERN_4194K.is_dir():
        pytest.skip(f"reference pattern not found at {PATTERN_4194K}")
    text = (REPO_ROOT / "README.md").read_text()
    rows = re.findall(r"^\| ([\d.]+) GiB[^|]*\|(.*)\|$", text, flags=re.M)
    assert len(rows) == 2, "the capacity table's rows were not found"
    columns = [  # the table's four configurations
        ["--sparsity", "0", "--kv-bits", "16", "--no-w8a8"],
        ["--sparsity", "0", "--kv-bits", "4"],
        ["--sparsity", "0.5", "--kv-bits", "4"],
        ["--sparsity", "0.75", "--kv-bits", "4"],
    ]
    common = ["--pattern", str(PATTERN_4194K), "--sink", "128", "--recent", "256", "--chunk-size", "16384"]
    for memory, cells in rows:
        shown = [re.search(r"([\d.]+)M tokens", cell).group(1) for cell in cells.split("|")]
        assert len(shown) == len(columns)
        for value, column in zip(shown, columns, strict=True):
            tokens = _plan_tokens(*common, *column, "--memory", f"{memory}GiB")
            decimals = len(value.split(".")[1])
            assert f"{tokens / 1e6:.{decimals}f}" == value, (memory, column, tokens, value)


@pytest.mark.slow
def test_ask_takes_the_question_after_doc(tmp_path, capsys):
    """`ask --doc FILE "question"`, as users type it, answers from the file."""
    text = haystack_text(1400)
    book = tmp_path / "note.txt"
    book.write_text(text[:700] + " The secret number is 48213. " + text[700:])
    question = "According to the document, what is the secret number?"
    code = cli(
        ["ask", "--doc", str(book), question, "--max-new-tokens", "16", "--cpu", "--max-tokens", "2048"]
    )
    assert code == 0
    assert "48213" in capsys.readouterr().out
