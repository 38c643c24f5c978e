"""Uploads are read in a child process (``read_documents``): a file built to stall its reader or to swell in memory
costs that child, which is stopped at the read's time or memory limit with a message naming the file, while this
process (the server) reads on. Every file is built here; nothing is downloaded."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_documents import write_epub, write_pdf

from duo_qserve.documents import DocumentError, DocumentTooLong, ReadLimits, read_document, read_documents

PLANTED = "The planted sentence survives the hostile input."
STALLING_LEVELS = 15  # 32,768 pages from 2 KB: half a minute of pypdf's work on the machine that wrote this


def stalling_pdf(path: Path, levels: int) -> Path:
    """A valid PDF of 2**levels pages from a file of a few KB: each node of its page tree lists the node below it
    twice, and the one page at the bottom draws PLANTED. pypdf refuses a tree of more than 100,000 entries (nodes
    and pages), so 15 levels, 32,768 pages, is the most it reads."""
    stream = f"BT /F1 12 Tf 72 720 Td ({PLANTED}) Tj ET"
    bottom = 10 + levels
    objects = {
        1: "<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [10 0 R] /Count {2**levels} >>",
        3: f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream",
        4: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
        bottom: "<< /Type /Page /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> /Contents 3 0 R >>",
    }
    for level in range(levels):
        below = 10 + level + 1
        objects[10 + level] = (
            f"<< /Type /Pages /Kids [{below} 0 R {below} 0 R] /Count {2 ** (levels - level)} >>"
        )
    raw = bytearray(b"%PDF-1.4\n")
    offsets = {}
    for number in sorted(objects):
        offsets[number] = len(raw)
        raw += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode()
    xref_at, size = len(raw), bottom + 1
    raw += f"xref\n0 {size}\n".encode()
    raw += b"".join(
        (f"{offsets[n]:010d} 00000 n \n" if n in offsets else "0000000000 65535 f \n").encode()
        for n in range(size)
    )
    raw += f"trailer\n<< /Size {size} /Root 1 0 R >>\nstartxref\n{xref_at}\n%%EOF\n".encode()
    path.write_bytes(bytes(raw))
    return path


def swelling_text(path: Path) -> Path:
    """6 MB of three-byte lines: reading splits it into two million line strings, about 30 times its size."""
    path.write_bytes(b"ab\n" * 2_000_000)
    return path


def children() -> set[int]:
    """The processes this one started that are still there (zombies included)."""
    tasks = Path("/proc/self/task")
    return {int(pid) for task in tasks.iterdir() for pid in (task / "children").read_text().split()}


def test_a_pdf_built_to_stall_its_reader_is_stopped_at_the_time_limit_and_the_reader_reads_on(tmp_path):
    """The 15-level page tree would take half a minute; the read stops at its 1.5 s limit, says which file and what
    limit, leaves no process behind, and the next read (here: the same tree at 8 levels, 256 pages, which is a
    valid PDF read in full) goes through."""
    before = children()
    started = time.monotonic()
    with pytest.raises(DocumentError) as refused:
        read_documents([stalling_pdf(tmp_path / "stall.pdf", STALLING_LEVELS)], ReadLimits(max_seconds=1.5))
    assert time.monotonic() - started < 4
    message = str(refused.value)
    assert message.startswith("'stall.pdf' was not read within 1.5 s") and "\n" not in message, message
    assert children() <= before
    small = read_documents([stalling_pdf(tmp_path / "small.pdf", 8)], ReadLimits(max_seconds=30))
    assert small.text.count(PLANTED) == 256


def test_the_time_limit_is_for_all_files_of_a_read_together_and_names_the_file_it_ran_out_in(tmp_path):
    first, stall = tmp_path / "first.txt", stalling_pdf(tmp_path / "stall.pdf", STALLING_LEVELS)
    first.write_text(PLANTED)
    with pytest.raises(DocumentError, match=r"^'stall\.pdf' was not read within 2 s"):
        read_documents([first, stall], ReadLimits(max_seconds=2))


def test_text_that_swells_in_memory_is_stopped_at_the_memory_limit_and_small_files_read_under_it(tmp_path):
    limits = ReadLimits(max_memory_bytes=128 << 20)
    with pytest.raises(DocumentError) as refused:
        read_documents([swelling_text(tmp_path / "swell.txt")], limits)
    message = str(refused.value)
    assert message.startswith("'swell.txt' needs more than 128 MiB of memory to read"), message
    book = tmp_path / "book.txt"
    book.write_text(f"{PLANTED}\n\n" * 1000)
    assert read_documents([book], limits).text.count(PLANTED) == 1000


def test_a_reader_killed_from_outside_is_reported_with_its_files_name_and_how_it_stopped(tmp_path):
    """What the kernel's out-of-memory killer would do to a reader: the read says so; nothing else is hurt."""
    before = children()
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_documents(
                [stalling_pdf(tmp_path / "stall.pdf", STALLING_LEVELS)], ReadLimits(max_seconds=60)
            )
        except DocumentError as exc:
            outcome.append(exc)

    reading = threading.Thread(target=read)
    reading.start()
    deadline = time.monotonic() + 30
    while not (started := children() - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started, "no reader process started"
    os.kill(started.pop(), signal.SIGKILL)
    reading.join(30)
    assert outcome and str(outcome[0]).startswith(
        "'stall.pdf' could not be read: its reader stopped (signal SIGKILL)"
    ), outcome


def _txt(path: Path) -> Path:
    path.write_text(
        "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e.\n\nCHAPTER I.\n\nIt was a dark night.\n\nCHAPTER II.\n\nDawn.\n",
        encoding="utf-8",
    )
    return path


def _latin1(path: Path) -> Path:
    path.write_bytes("Caf\u00e9 cr\u00e8me: the words of a book not saved as UTF-8.\n".encode("cp1252"))
    return path


def _html(path: Path) -> Path:
    path.write_text(
        "<html><head><title>Title &amp; more</title></head><body><h1>One</h1><p>First.</p>"
        "<h2>Two</h2><pre>  kept   as is</pre></body></html>"
    )
    return path


def _pdf(path: Path) -> Path:
    return write_pdf(path, [["Page one."], ["Page two."]], [("Start", 0), ("Next", 1)], "A PDF Title")


@pytest.mark.parametrize(
    "name, write",
    [
        ("book.txt", _txt),
        ("latin.txt", _latin1),  # with a warning, which comes back too
        ("page.html", _html),
        ("book.epub", write_epub),
        ("book.pdf", _pdf),
    ],
)
def test_a_file_reads_through_the_child_exactly_as_in_this_process(tmp_path, name, write):
    path = write(tmp_path / name)
    assert read_documents([path], names=["Given name" + path.suffix]) == read_document(
        path, name="Given name" + path.suffix
    )


def test_a_readers_refusals_come_back_as_they_were_raised(tmp_path):
    """The same message, and a too-long text stays ``DocumentTooLong`` with its bound (the app tells it apart)."""
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DocumentError) as here:
        read_document(binary)
    with pytest.raises(DocumentError) as apart:
        read_documents([binary])
    assert str(apart.value) == str(here.value) and "'binary.txt'" in str(apart.value)
    long = _txt(tmp_path / "long.txt")
    with pytest.raises(DocumentTooLong) as too_long:
        read_documents([long], ReadLimits(max_chars=10))
    assert too_long.value.max_chars == 10 and "'long.txt'" in str(too_long.value)
