"""Hostile uploads: every case is generated here, read in a forked child under a time and memory bound, and
must end in a specific outcome - the planted text read back (with the expected chapters or warnings) or a
DocumentError that says what is wrong. Nothing is committed as a file and nothing is downloaded."""

from __future__ import annotations

import atexit
import io
import multiprocessing
import os
import random
import resource
import shutil
import tempfile
import traceback
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from test_documents import write_pdf

from duo_qserve.documents import Document, DocumentError, ReadLimits, read_document

TIME_LIMIT_S = 10
MEMORY_LIMIT = 2 << 30  # peak RSS a single hostile input may add
PLANTED = "The planted sentence survives the hostile input."
SECOND = "A second planted sentence, in another part."
DEFAULT_LIMITS = ReadLimits()


@dataclass
class Case:
    id: str
    name: str  # file name, whose suffix picks the reader
    build: Callable[[], bytes]
    expect: Callable[[Document | DocumentError], None]
    limits: ReadLimits = DEFAULT_LIMITS


# --- expectations ------------------------------------------------------------------------------------------


def reads(
    *sentences: str, chapters: list[str] | None = None, warning: str | None = None, title: str | None = None
):
    """The document holds each sentence (and the chapters, a warning containing the words, the title)."""

    def check(outcome: Document | DocumentError) -> None:
        assert isinstance(outcome, Document), f"expected text, got {outcome!r}"
        for sentence in sentences:
            assert sentence in outcome.text, (sentence, outcome.text[:300])
        if chapters is not None:
            assert [c.title for c in outcome.chapters] == chapters
        if warning is not None:
            assert any(warning in w for w in outcome.warnings), (warning, outcome.warnings)
        if title is not None:
            assert outcome.title == title

    return check


def refused(*words: str):
    """A one-line DocumentError naming the file and containing each of the words."""

    def check(outcome: Document | DocumentError) -> None:
        assert isinstance(outcome, DocumentError), (
            f"expected a DocumentError, got text {outcome.text[:200]!r}"
        )
        message = str(outcome)
        assert "\n" not in message and all(word in message for word in words), message

    return check


def one_of(*checks: Callable[[Document | DocumentError], None]):
    """Either outcome is right (a damaged file that may or may not keep some text), but one must hold."""

    def check(outcome: Document | DocumentError) -> None:
        errors = []
        for option in checks:
            try:
                option(outcome)
                return
            except AssertionError as exc:
                errors.append(str(exc))
        raise AssertionError(" / ".join(errors))

    return check


# --- builders ----------------------------------------------------------------------------------------------


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def prose(size: int) -> str:
    """Random lower-case words: text that compresses like prose, not like a bomb."""
    letters = (b"abcdefghijklmnopqrstuvwxyz " * 10)[:256]
    return random_bytes(size, 9).translate(letters).decode()


def html_page(body: str) -> str:
    return f"<html><head><title>T</title></head><body>{body}</body></html>"


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


CONTAINER = (
    b'<?xml version="1.0"?><container xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles>'
    b'<rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles></container>'
)


def epub_bytes(
    chapters: dict[str, bytes | str],
    spine: list[str] | None = None,
    nav: str | None = "default",
    extra_manifest: str = "",
    container: bytes | None = CONTAINER,
    title: str = "Hostile Book",
    extra_members: dict[str, bytes] | None = None,
) -> bytes:
    """An EPUB 3 with the chapters (OEBPS/<name> -> XHTML), a nav linking each one, in the given spine order."""
    ids = {name: f"c{i}" for i, name in enumerate(chapters)}
    manifest = "".join(
        f'<item id="{ids[name]}" href="{name}" media-type="application/xhtml+xml"/>' for name in chapters
    )
    links = "".join(f'<li><a href="{name}">Part {i}</a></li>' for i, name in enumerate(chapters, 1))
    members: dict[str, bytes] = {"mimetype": b"application/epub+zip"}
    if container is not None:
        members["META-INF/container.xml"] = container
    if nav is not None:
        manifest += '<item id="nav" href="nav.xhtml" media-type="application/xhtml+xml" properties="nav"/>'
        members["OEBPS/nav.xhtml"] = (
            f'<html><body><nav epub:type="toc"><ol>{links}</ol></nav></body></html>'
            if nav == "default"
            else nav
        ).encode()
    itemrefs = "".join(
        f'<itemref idref="{ids.get(name, name)}"/>' for name in (list(chapters) if spine is None else spine)
    )
    members["OEBPS/content.opf"] = (
        f'<?xml version="1.0"?><package version="3.0"><metadata><dc:title>{title}</dc:title></metadata>'
        f"<manifest>{manifest}{extra_manifest}</manifest><spine>{itemrefs}</spine></package>"
    ).encode()
    for name, content in chapters.items():
        members[f"OEBPS/{name}"] = content.encode() if isinstance(content, str) else content
    members.update(extra_members or {})
    return zip_bytes(members)


def chapter(text: str) -> str:
    return f"<html><body><p>{text}</p></body></html>"


def lying_zip() -> bytes:
    """A chapter whose zip headers claim 1,000 bytes while its data inflates to 4 MiB."""
    data = bytearray(epub_bytes({"a.xhtml": chapter(PLANTED), "b.xhtml": chapter("x" * (4 << 20))}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("OEBPS/b.xhtml")
    true_size = info.file_size.to_bytes(4, "little")
    for at in range(len(data) - 4):
        if data[at : at + 4] == true_size and data[at - 4 : at] == info.compress_size.to_bytes(4, "little"):
            data[at : at + 4] = (1000).to_bytes(4, "little")
    return bytes(data)


def corrupt_member() -> bytes:
    """The second chapter's compressed bytes are overwritten."""
    data = bytearray(epub_bytes({"a.xhtml": chapter(PLANTED), "b.xhtml": chapter("lost " * 5000)}))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("OEBPS/b.xhtml")
    start = info.header_offset + 30 + len(info.filename)
    data[start : start + info.compress_size] = bytes(range(1, 256))[: info.compress_size]
    return bytes(data)


def pdf_bytes(tmp: Path, pages: list[list[str]], title: str | None = None) -> bytes:
    return write_pdf(tmp / "built.pdf", pages, outline=[], title=title).read_bytes()


def flate_bomb_pdf(tmp: Path) -> bytes:
    """A valid PDF whose page content inflates to 200 MB."""
    raw = pdf_bytes(tmp, [[PLANTED]])
    stream = zlib.compress(b" " * 200_000_000, 9)
    at = raw.index(b"/Contents ")
    number = int(raw[at + 10 :].split(b" ", 1)[0])
    marker = f"{number} 0 obj".encode()
    start = raw.index(marker)
    end = raw.index(b"endobj", start)
    body = f"{number} 0 obj\n<< /Length {len(stream)} /Filter /FlateDecode >>\nstream\n".encode()
    return raw[:start] + body + stream + b"\nendstream\n" + raw[end:]


# --- the cases ---------------------------------------------------------------------------------------------

SUFFIXES = [".txt", ".md", ".html", ".htm", ".epub", ".pdf"]
TEXT_SUFFIXES = [".txt", ".md", ".html"]
PARSE_FAILURE = {".epub": "could not be parsed as EPUB", ".pdf": "could not be parsed as PDF"}


def wrap(suffix: str, text: str) -> str:
    return html_page(text) if suffix in (".html", ".htm") else text


def cases(tmp: Path) -> list[Case]:
    found: list[Case] = []

    def add(
        id_: str, name: str, build: Callable[[], bytes], expect, limits: ReadLimits = DEFAULT_LIMITS
    ) -> None:
        found.append(Case(id_, name, build, expect, limits))

    # Random bytes and empty / NUL files, whatever the extension.
    for suffix in SUFFIXES:
        for size in (300, 4096, 65536, 1 << 20):
            for seed in (1, 2):
                add(
                    f"random-{size}-{seed}{suffix}",
                    f"random{suffix}",
                    lambda size=size, seed=seed: random_bytes(size, seed),
                    refused(PARSE_FAILURE.get(suffix, "binary data")),
                )
        add(
            f"empty{suffix}",
            f"empty{suffix}",
            lambda: b"",
            refused(PARSE_FAILURE.get(suffix, "contains no text")),
        )
        add(
            f"nuls{suffix}",
            f"nuls{suffix}",
            lambda: b"\x00" * (1 << 20),
            refused(PARSE_FAILURE.get(suffix, "binary")),
        )
        add(
            f"random-after-header{suffix}",
            f"header{suffix}",
            lambda suffix=suffix: (
                {".pdf": b"%PDF-1.7\n", ".epub": b"PK\x03\x04"}.get(suffix, PLANTED.encode())
                + random_bytes(100_000, 3)
            ),
            refused(PARSE_FAILURE.get(suffix, "binary data")),
        )

    # Encodings of the planted text, for every text format.
    sentence = "Caf\u00e9 na\u00efve: " + PLANTED
    encodings: list[tuple[str, Callable[[str], bytes], Callable]] = [
        ("utf-8", lambda t: t.encode(), reads(sentence)),
        ("utf-8-bom", lambda t: t.encode("utf-8-sig"), reads(sentence)),
        (
            "utf-8-bad-byte",
            lambda t: t.encode() + b"\xff " + t.encode(),
            reads(sentence, "\ufffd", warning="replaced"),
        ),
        (
            "utf-8-truncated",
            lambda t: t.encode() + "\u00e9".encode()[:1],
            reads(sentence, warning="replaced"),
        ),
        ("utf-16", lambda t: t.encode("utf-16"), reads(sentence)),
        ("utf-16-be-bom", lambda t: codecs_bom("utf-16-be", t), reads(sentence)),
        ("utf-16-le-no-bom", lambda t: t.encode("utf-16-le"), reads(sentence, warning="no byte-order mark")),
        ("utf-16-be-no-bom", lambda t: t.encode("utf-16-be"), reads(sentence, warning="no byte-order mark")),
        ("utf-32", lambda t: t.encode("utf-32"), reads(sentence)),
        ("utf-32-be-bom", lambda t: codecs_bom("utf-32-be", t), reads(sentence)),
        ("utf-32-le-no-bom", lambda t: t.encode("utf-32-le"), reads(sentence, warning="no byte-order mark")),
        ("utf-32-be-no-bom", lambda t: t.encode("utf-32-be"), reads(sentence, warning="no byte-order mark")),
        ("latin-1", lambda t: t.encode("latin-1"), reads(sentence, warning="not UTF-8")),
        (
            "cp1252",
            lambda t: (t + " \u201cquoted\u201d").encode("cp1252"),
            reads(sentence, "\u201cquoted\u201d"),
        ),
        ("utf-16-bom-odd", lambda t: t.encode("utf-16") + b"\x00", reads(sentence)),
        ("utf-16-bom-random", lambda t: b"\xff\xfe" + random_bytes(20000, 4), refused("binary data")),
        ("utf-32-bom-random", lambda t: b"\xff\xfe\x00\x00" + random_bytes(20000, 5), refused("binary data")),
        ("controls", lambda t: t.encode() + bytes(range(1, 9)) * 40, refused("binary data")),
    ]
    for suffix in TEXT_SUFFIXES:
        for label, encode, expect in encodings:
            add(
                f"{label}{suffix}",
                f"enc{suffix}",
                lambda encode=encode, suffix=suffix: encode(wrap(suffix, sentence)),
                expect,
            )
    add(
        "declared-charset.html",
        "declared.html",
        lambda: ('<meta charset="iso-8859-15"><p>' + sentence + " \u20ac5</p>").encode("iso-8859-15"),
        reads(sentence, "\u20ac5"),
    )

    # Pathological lines for every pattern the plain-text and Markdown readers have.
    n = 200_000
    text_attacks = {
        "md-heading-spaces": "# a" + " " * n + "x",  # the old backtracking heading regex
        "md-heading-tabs-closing": "# a" + " \t" * n + "#",
        "md-heading-hashes": "# " + "#" * n,
        "md-only-hashes": "#" * n,
        "md-many-heading-lines": "# h\n" * (n // 4),
        "md-closing-words": "## " + "a " * n + "##",
        "md-fences": "```\n" * (n // 4),
        "md-fence-run": "`" * n,
        "chapter-spaces": "Chapter " + " " * n,
        "chapter-colon-spaces": "chapter 1:" + " " * n + ".",
        "chapter-long-name": "Chapter 1: " + "x" * n,
        "chapter-toc-run": "Chapter 1\n" * (n // 10),
        "part-words": "Part " + "twenty-" * (n // 7),
        "numbered-long": "1 " + "A" * n,
        "numbered-commas": "1. A" + "a," * n,
        "digits-line": "1" * n,
        "blank-lines": "\n" * n,
        "spaces": " " * n + "\n",
        "crlf-mix": "\r\n\r" * n,
    }
    for label, attack in text_attacks.items():
        for suffix in (".txt", ".md"):
            add(
                f"{label}{suffix}",
                f"attack{suffix}",
                lambda a=attack: (PLANTED + "\n\n" + a + "\n\n" + SECOND).encode(),
                reads(PLANTED, SECOND),
            )
    add(
        "txt-chapters-after-attacks",
        "book.txt",
        lambda: ("Chapter 1: Start\n" + PLANTED + "\n" + "x" * n + "\n\nPart Two\n" + SECOND).encode(),
        reads(PLANTED, SECOND, chapters=["Chapter 1: Start", "Part Two"]),
    )
    for suffix in (".txt", ".md", ".html"):
        add(
            f"huge-line{suffix}",
            f"line{suffix}",
            lambda s=suffix: wrap(s, PLANTED + " word" * 1_000_000).encode(),
            reads(PLANTED),
        )

    # Markup attacks: unclosed constructs that make html.parser quadratic, deep nesting, references.
    m = 100_000
    markup_attacks = {
        "unclosed-tags": "<a" * m,
        "unclosed-comments": "<!--" * m,
        "end-tag-starts": "</" * m,
        "marked-sections": "<![" * m,
        "unclosed-double-quotes": '<a b="' * m,
        "unclosed-single-quotes": "<a b='" * m,
        "many-attributes": "<a " + "b=c " * m + ">",
        "long-tag-name": "<" + "a" * m,
        "slashes": "<a/" * m,
        "equals": "<a b=" * m,
        "whitespace-tags": "<a\t\n" * m,
        "long-charref": "&#" + "9" * m,
        "charref-run": "&#99999999999;" * (m // 10),
        "ampersands": "&" * m,
        "processing-instructions": "<?" * m,
        "doctypes": "<!DOCTYPE" * m,
        "cdata-starts": "<![CDATA[" * m,
        "unclosed-p": "<p>x" * m,
        "stray-end-tags": "</p></div>" * m,
        "unclosed-b": "<b>" * m + "tail",
        "unclosed-title": "<title>" * m,
        "script-starts": "<script>" * m,
        "lt-text": "a < b " * m,
    }
    for label, attack in markup_attacks.items():
        add(
            f"{label}.html",
            "attack.html",
            lambda a=attack: html_page(f"<p>{PLANTED}</p>" + a).encode(),
            reads(PLANTED),
        )
    for depth in (500, 10_000, 100_000):
        for tag in ("div", "span", "p"):
            add(
                f"nested-{tag}-{depth}.html",
                "deep.html",
                lambda tag=tag, depth=depth: html_page(
                    f"<{tag}>" * depth + PLANTED + f"</{tag}>" * depth + f"<h1>End</h1><p>{SECOND}</p>"
                ).encode(),
                reads(PLANTED, SECOND, chapters=["End"]),
            )
    add(
        "nested-unclosed.htm",
        "deep.htm",
        lambda: html_page("<div><b><i>" * 50_000 + PLANTED).encode(),
        reads(PLANTED),
    )
    add(
        "unclosed-comment-warns.html",
        "c.html",
        lambda: html_page(f"<p>{PLANTED}</p><!-- rest").encode(),
        reads(PLANTED, warning="unclosed <!--"),
    )
    add(
        "heading-huge.html",
        "h.html",
        lambda: html_page("<h1>" + "Title " * m + "</h1>" + f"<p>{PLANTED}</p>").encode(),
        reads(PLANTED),
    )

    # EPUB: bombs, each limit on its own.
    no_ratio = ReadLimits(max_compression_ratio=1e12)
    add(
        "bomb-ratio.epub",
        "bomb.epub",
        lambda: epub_bytes({"a.xhtml": b"<p>" + b" " * (60 << 20)}),
        refused("zip bomb", "times its size"),
    )
    add(
        "bomb-member.epub",
        "bomb.epub",
        lambda: epub_bytes({"a.xhtml": b" " * (70 << 20)}),
        refused("zip bomb", "for one file"),
        no_ratio,
    )
    add(
        "bomb-total.epub",
        "bomb.epub",
        lambda: epub_bytes({f"{i}.xhtml": b" " * (3 << 20) for i in range(4)}),
        refused("zip bomb", "would expand"),
        replace(no_ratio, max_unzipped_bytes=8 << 20),
    )
    add(
        "bomb-members.epub",
        "many.epub",
        lambda: zip_bytes({f"{i}.xhtml": b"" for i in range(20_000)}, zipfile.ZIP_STORED),
        refused("20,000 files"),
    )
    add("bomb-lying-header.epub", "lying.epub", lying_zip, reads(PLANTED, warning="b.xhtml"))
    add(
        "bomb-stored-many-small.epub",
        "small.epub",
        lambda: epub_bytes({f"{i}.xhtml": chapter(f"{PLANTED} {i}") for i in range(2000)}),
        reads(f"{PLANTED} 1999"),
    )

    # EPUB: structure.
    two = {"a.xhtml": chapter(PLANTED), "b.xhtml": chapter(SECOND)}
    add(
        "epub-basic.epub",
        "book.epub",
        lambda: epub_bytes(two),
        reads(PLANTED, SECOND, chapters=["Part 1", "Part 2"], title="Hostile Book"),
    )
    for depth in (500, 10_000, 100_000):
        add(
            f"epub-nested-{depth}.epub",
            "deep.epub",
            lambda depth=depth: epub_bytes(
                {
                    "a.xhtml": "<html><body>"
                    + "<div>" * depth
                    + PLANTED
                    + "</div>" * depth
                    + "</body></html>",
                    "b.xhtml": chapter(SECOND),
                }
            ),
            reads(PLANTED, SECOND),
        )
    add(
        "epub-text-node-20mb.epub",
        "big.epub",
        lambda: epub_bytes({"a.xhtml": chapter(prose(20 << 20) + PLANTED)}),
        reads(PLANTED),
    )
    add(
        "epub-spine-unknown-id.epub",
        "s.epub",
        lambda: epub_bytes(two, spine=["a.xhtml", "ghost", "b.xhtml"]),
        reads(PLANTED, SECOND, warning="'ghost'"),
    )
    add(
        "epub-manifest-missing-file.epub",
        "m.epub",
        lambda: epub_bytes(
            two,
            spine=["a.xhtml", "gone", "b.xhtml"],
            extra_manifest='<item id="gone" href="gone.xhtml" media-type="application/xhtml+xml"/>',
        ),
        reads(PLANTED, SECOND, warning="missing"),
    )
    add(
        "epub-path-traversal.epub",
        "t.epub",
        lambda: epub_bytes(
            two,
            spine=["a.xhtml", "evil", "b.xhtml"],
            extra_manifest='<item id="evil" href="../../../etc/passwd" media-type="application/xhtml+xml"/>',
        ),
        reads(PLANTED, SECOND, warning="outside the book"),
    )
    add(
        "epub-nav-traversal.epub",
        "n.epub",
        lambda: epub_bytes(
            two,
            nav='<nav epub:type="toc"><a href="../../x.xhtml">Evil</a><a href="/etc/passwd">Abs</a><a href="http://x/y">Web</a></nav>',
        ),
        reads(PLANTED, SECOND, chapters=[]),
    )
    add(
        "epub-nav-garbage.epub",
        "g.epub",
        lambda: epub_bytes(two, nav="<nav><a href=" + '"' * 1000),
        reads(PLANTED, SECOND),
    )
    add(
        "epub-nav-binary.epub",
        "b.epub",
        lambda: epub_bytes(
            two,
            nav=None,
            extra_manifest='<item id="nav" href="nav.xhtml" properties="nav" media-type="application/xhtml+xml"/>',
            extra_members={"OEBPS/nav.xhtml": random_bytes(5000, 6)},
        ),
        reads(PLANTED, SECOND, warning="binary"),
    )
    add(
        "epub-no-nav-headings.epub",
        "h.epub",
        lambda: epub_bytes(
            {"a.xhtml": f"<h1>One</h1><p>{PLANTED}</p>", "b.xhtml": f"<h2>Two</h2><p>{SECOND}</p>"}, nav=None
        ),
        reads(PLANTED, SECOND, chapters=["One", "Two"]),
    )
    add(
        "epub-no-container.epub",
        "c.epub",
        lambda: epub_bytes(two, container=None),
        reads(PLANTED, SECOND, warning="container.xml"),
    )
    add(
        "epub-bad-container.epub",
        "c.epub",
        lambda: epub_bytes(two, container=b'<rootfile full-path="../../x.opf"/>'),
        reads(PLANTED, SECOND, warning="container.xml"),
    )
    add(
        "epub-no-opf.epub",
        "o.epub",
        lambda: zip_bytes({"z.xhtml": chapter(SECOND).encode(), "a.xhtml": chapter(PLANTED).encode()}),
        reads(PLANTED, SECOND, warning="name order"),
    )
    add(
        "epub-no-chapters.epub",
        "x.epub",
        lambda: zip_bytes({"image.png": random_bytes(1000, 7)}),
        refused("holds no chapters"),
    )
    add(
        "epub-empty-spine.epub",
        "e.epub",
        lambda: epub_bytes(two, spine=[]),
        reads(PLANTED, SECOND, warning="manifest order"),
    )
    add(
        "epub-duplicate-spine.epub",
        "d.epub",
        lambda: epub_bytes(two, spine=["a.xhtml"] * 500 + ["b.xhtml"]),
        reads(PLANTED, SECOND),
    )
    add(
        "epub-binary-chapter.epub",
        "bc.epub",
        lambda: epub_bytes({"a.xhtml": chapter(PLANTED), "b.xhtml": random_bytes(10000, 8)}),
        reads(PLANTED, warning="binary"),
    )
    add("epub-corrupt-member.epub", "cm.epub", corrupt_member, reads(PLANTED, warning="b.xhtml"))
    add(
        "epub-utf16-chapter.epub",
        "u.epub",
        lambda: epub_bytes({"a.xhtml": chapter(PLANTED).encode("utf-16"), "b.xhtml": chapter(SECOND)}),
        reads(PLANTED, SECOND),
    )
    add(
        "epub-latin1-declared.epub",
        "l.epub",
        lambda: epub_bytes(
            {"a.xhtml": ('<?xml version="1.0" encoding="iso-8859-1"?>' + chapter(sentence)).encode("latin-1")}
        ),
        reads(sentence),
    )
    add(
        "epub-deep-opf.epub",
        "do.epub",
        lambda: epub_bytes(two, extra_manifest="<x>" * 100_000),
        reads(PLANTED, SECOND),
    )
    for fraction in (0.1, 0.5, 0.9, 0.99):
        add(
            f"epub-truncated-{fraction}.epub",
            "cut.epub",
            lambda fraction=fraction: (lambda data: data[: int(len(data) * fraction)])(epub_bytes(two)),
            refused("could not be parsed as EPUB"),
        )
    add(
        "epub-not-zip.epub",
        "nz.epub",
        lambda: chapter(PLANTED).encode(),
        refused("could not be parsed as EPUB"),
    )

    # PDF: damage, bombs, chapters from headings, junk metadata.
    good = pdf_bytes(tmp, [["Chapter 1: The Start", PLANTED], ["Chapter 2: The End", SECOND]])
    add(
        "pdf-heading-chapters.pdf",
        "notes.pdf",
        lambda: good,
        reads(PLANTED, SECOND, chapters=["Chapter 1: The Start", "Chapter 2: The End"], title="notes"),
    )
    add(
        "pdf-numbered-chapters.pdf",
        "paper.pdf",
        lambda: pdf_bytes(
            tmp, [["1 Introduction", PLANTED], ["2 Related Work", SECOND], ["3 Results", "Numbers."]]
        ),
        reads(PLANTED, chapters=["1 Introduction", "2 Related Work", "3 Results"]),
    )
    add(
        "pdf-running-header.pdf",
        "run.pdf",
        lambda: pdf_bytes(tmp, [[f"{i} The Art of Reading", f"{PLANTED} {i}"] for i in range(1, 5)]),
        reads(PLANTED, chapters=[]),
    )
    add(
        "pdf-part-roman.pdf",
        "parts.pdf",
        lambda: pdf_bytes(tmp, [["Part One", PLANTED, "CHAPTER IV", PLANTED], ["Part Two", SECOND]]),
        reads(PLANTED, chapters=["Part One", "CHAPTER IV", "Part Two"]),
    )
    for junk in (
        "(anonymous)",
        "Untitled",
        "untitled-3",
        "Microsoft Word - thesis.docx",
        "untitled.docx",
        "   ",
        "1234",
        "C:\\books\\draft.pdf",
    ):
        add(
            f"pdf-title-{junk.strip() or 'blank'}.pdf",
            "my-book.pdf",
            lambda junk=junk: pdf_bytes(tmp, [[PLANTED]], title=junk),
            reads(PLANTED, title="my-book"),
        )
    add(
        "pdf-title-real.pdf",
        "x.pdf",
        lambda: pdf_bytes(tmp, [[PLANTED]], title="A Real Title"),
        reads(PLANTED, title="A Real Title"),
    )
    for fraction in (0.3, 0.6, 0.9, 0.99):
        add(
            f"pdf-truncated-{fraction}.pdf",
            "cut.pdf",
            lambda fraction=fraction: good[: int(len(good) * fraction)],
            one_of(reads(PLANTED), refused("could not be parsed as PDF"), refused("contains no text")),
        )
    add(
        "pdf-bad-xref.pdf",
        "x.pdf",
        lambda: good.replace(b"startxref", b"startxrex"),
        one_of(reads(PLANTED), refused("could not be parsed as PDF")),
    )
    add("pdf-flate-bomb.pdf", "bomb.pdf", lambda: flate_bomb_pdf(tmp), refused("decompression bomb"))
    add(
        "pdf-deep-array.pdf",
        "deep.pdf",
        lambda: good.replace(
            b"/MediaBox [0 0 612 792]", b"/MediaBox [0 0 612 792] /Deep " + b"[" * 50_000 + b"]" * 50_000
        ),
        one_of(reads(PLANTED), refused("could not be parsed as PDF")),
    )
    add("pdf-header-only.pdf", "h.pdf", lambda: b"%PDF-1.4\n%%EOF\n", refused("could not be parsed as PDF"))
    return found


def codecs_bom(encoding: str, text: str) -> bytes:
    return "\ufeff".encode(encoding) + text.encode(encoding)


# --- running a case ----------------------------------------------------------------------------------------


def _child(case: Case, path: Path, connection) -> None:
    """Read under a memory bound; send back None (the expectation held) or what went wrong."""
    page = os.sysconf("SC_PAGE_SIZE")
    virtual = int(Path("/proc/self/statm").read_text().split()[0]) * page
    resource.setrlimit(resource.RLIMIT_AS, (virtual + MEMORY_LIMIT + (1 << 30), resource.RLIM_INFINITY))
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * page
    try:
        try:
            outcome: Document | DocumentError = read_document(path, case.limits)
        except DocumentError as exc:
            outcome = exc
        case.expect(outcome)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        added = peak - rss_before
        connection.send(None if added <= MEMORY_LIMIT else f"peak RSS grew by {added / 2**30:.2f} GiB")
    except BaseException:
        connection.send(traceback.format_exc(limit=6))


_BUILD_DIR = Path(tempfile.mkdtemp(prefix="hostile-documents-"))  # where write_pdf puts its file
atexit.register(shutil.rmtree, _BUILD_DIR, True)
ALL_CASES = cases(_BUILD_DIR)


@pytest.mark.parametrize("case", ALL_CASES, ids=[case.id for case in ALL_CASES])
def test_hostile_input(case: Case, tmp_path: Path) -> None:
    path = tmp_path / case.name
    path.write_bytes(case.build())
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_child, args=(case, path, send))
    child.start()
    child.join(TIME_LIMIT_S)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{case.id} took more than {TIME_LIMIT_S} s")
    assert receive.poll(), f"{case.id}: the child died (exit code {child.exitcode}) without a result"
    problem = receive.recv()
    assert problem is None, problem


def test_suite_is_large_enough() -> None:
    assert len(ALL_CASES) >= 200
