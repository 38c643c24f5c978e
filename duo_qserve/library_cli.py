"""``python -m duo_qserve library {save,load,list,rm}``: the book library (``duo_qserve.library``) from a shell."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from duo_qserve import library
from duo_qserve.engine import Engine, token_sha256
from duo_qserve.options import add_engine_args, settings_from_args


def add_library_command(sub: argparse._SubParsersAction) -> None:
    """The ``library`` command and its four sub-commands, on the top-level parser's ``sub``."""
    parser = sub.add_parser("library", help="save, load, list and remove pre-filled documents")
    parser.add_argument(
        "--dir", default=None, help="library directory (default: $DUO_QSERVE_LIBRARY or library/)"
    )
    actions = parser.add_subparsers(dest="library_command", required=True)

    p = actions.add_parser("save", help="pre-fill a document and save its cache")
    p.add_argument("--doc", nargs="+", required=True, help="txt, md, epub, pdf or html files")
    p.add_argument("--title", default=None)
    p.add_argument(
        "--checkpoint-every", type=int, default=8, help="chunks between resume checkpoints (0: none)"
    )
    add_engine_args(p)
    p.set_defaults(func=_save)

    p = actions.add_parser("load", help="load a saved book and answer questions")
    p.add_argument("book", help="book id (see 'list') or book directory")
    p.add_argument("--ask", action="append", default=[], help="a question (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_engine_args(p, defaults=None)
    p.set_defaults(func=_load)

    p = actions.add_parser("list", help="the saved books")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)

    p = actions.add_parser("rm", help="delete a saved book")
    p.add_argument("book")
    p.set_defaults(func=_rm)


def print_progress(what: str, unit: str = "tokens", say: Callable[..., None] = print) -> library.Progress:
    """A progress callback that prints "what done/total unit" to stderr through ``say``: on a terminal one line
    redrawn in place (ended at done == total); elsewhere (a log file, a pipe) a carriage return would run every
    update into one line, so each tenth of the way gets a line of its own."""
    live = sys.stderr.isatty()
    shown = [-1]  # the last tenth given a line (off a terminal)

    def show(done: int, total: int) -> None:
        if unit == "GB":
            line = f"{what} {done / 1e9:.2f}/{total / 1e9:.2f} GB"
        else:
            line = f"{what} {done:,}/{total:,} {unit}"
        if live:
            say(f"\r{line}", end="\n" if done == total else "", file=sys.stderr, flush=True)
            return
        tenth = 10 * done // total if total else 10
        if tenth > shown[0]:
            shown[0] = tenth
            say(line, file=sys.stderr, flush=True)

    return show


def _save(a: argparse.Namespace) -> int:
    from duo_qserve.documents import read_documents

    doc = read_documents(a.doc)
    engine = Engine.from_settings(settings_from_args(a))
    ids = engine.document_ids(doc.text)
    title = a.title or doc.title
    if a.checkpoint_every:
        ckpt = library.library_dir(a.dir) / f".prefill-{token_sha256(ids)[:16]}"
        info = library.ingest_resumable(
            engine, ids, ckpt, a.checkpoint_every, print_progress("pre-fill"), title
        )
    else:
        info = engine.ingest(ids, on_progress=print_progress("pre-fill"), title=title)
    print(f"{info.tokens:,} tokens pre-filled in {info.prefill_seconds:.1f} s", file=sys.stderr)
    t0 = time.perf_counter()
    book = library.save(engine, a.dir, print_progress("save", "GB"), files=doc.files or a.doc)
    seconds = time.perf_counter() - t0
    print(f"saved {book.id} ({book.bytes / 1e9:.2f} GB in {seconds:.1f} s) in {Path(book.path).parent}")
    return 0


def _load(a: argparse.Namespace) -> int:
    """Options given override the book's settings (a mismatch is reported by ``library.load``)."""
    engine = Engine.from_settings(settings_from_args(a, base=library.book_settings(a.book, a.dir)))
    info = library.load(engine, a.book, a.dir, on_progress=print_progress("load", "GB"))
    print(f"loaded {info.title!r}: {info.tokens:,} tokens in {info.prefill_seconds:.1f} s", file=sys.stderr)
    for question in a.ask:
        if len(a.ask) > 1:
            print(f"\nQ: {question}\nA: ", end="")
        for piece in engine.ask(question, max_new_tokens=a.max_new_tokens):
            print(piece, end="", flush=True)
        print()
    return 0


def _list(a: argparse.Namespace) -> int:
    books, broken = library.scan(a.dir)
    for b in broken:
        print(f"not a loadable book: {b.path}: {b.error}", file=sys.stderr)
    if a.json:
        print(json.dumps([dataclasses.asdict(b) for b in books], indent=1))
        return 0
    if not books:
        print(f"no books in {library.library_dir(a.dir)}")
    for b in books:
        print(f"{b.id}  {b.tokens:>11,} tokens  {b.bytes / 1e9:7.2f} GB  {b.created}  {b.title}")
        print(f"    {b.model}; {b.settings}")
    return 0


def _rm(a: argparse.Namespace) -> int:
    library.remove(a.book, a.dir)
    print(f"removed {a.book}")
    return 0
