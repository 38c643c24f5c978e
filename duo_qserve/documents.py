"""Turn uploaded books (txt, md, epub, pdf, html) into one plain text with chapter positions.

The model reads the whole text, so extraction stays faithful (no reflowing, no summarising) and only
normalises whitespace modestly. Chapter starts are kept as character offsets so the app can show a table of
contents and map chapters onto token positions of the long context.

Uploads are hostile until read, so every reader here:

- runs in time linear in its input: markup goes through this module's own tokenizer (CPython's html.parser is
  quadratic on unclosed constructs), and every regex either has no overlapping quantifiers or only ever sees a
  bounded piece (a line of at most ``_MAX_HEADING_LINE`` characters, the first KiB of a file);
- walks nesting with an explicit stack, so any depth reads;
- stays within ``ReadLimits`` (upload size, zip members, decompressed sizes checked from the zip directory and
  again while decompressing, compression ratio, characters of text) and refuses what exceeds them early;
- reports what it could not read in ``Document.warnings`` instead of dropping it silently;
- raises only ``DocumentError``, whose message is for the person who uploaded the file.

Those rules bound what the readers here do; the libraries under them (pypdf above all) can still be led into
minutes of work or gigabytes of memory by a crafted file. So ``read_documents`` reads each file in a fresh
interpreter of its own (``_read_apart``), which is killed past ``ReadLimits.max_seconds`` and cannot take more than
``ReadLimits.max_memory_bytes``: a hostile upload costs its own read, never the process that serves everyone.

Text bytes are decoded by one rule (``_decode_text``): a byte-order mark (UTF-8/16/32) decides; else UTF-16/32
without one is recognised by its NUL pattern; else other NUL bytes mean binary; else UTF-8 when its valid
multi-byte characters are at least as many as its invalid bytes (those few are replaced, with a warning); else
Windows-1252 (a declared ``charset`` in HTML wins over that guess). The decoded text is binary when more than
``BINARY_CHAR_RATIO`` of its characters are control characters (other than tab, line feed, carriage return, form
feed), private-use characters or replacement characters.
"""

from __future__ import annotations

import bisect
import codecs
import html
import io
import json
import math
import os
import posixpath
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

from pypdf import PdfReader
from pypdf.errors import LimitReachedError

SUPPORTED_SUFFIXES = (".txt", ".md", ".epub", ".pdf", ".html", ".htm")
MiB = 1 << 20
GiB = 1 << 30
BINARY_CHAR_RATIO = 0.02


@dataclass(frozen=True)
class ReadLimits:
    """What one read may take; pass your own to ``read_document``/``read_documents`` to tighten or widen them.

    ``max_chars`` bounds the extracted text (counted as extracted, before blank lines are tidied), so a caller
    that only needs to know "does it fit" stops reading early; ``None`` means no bound. The zip limits apply to
    EPUB files, whose sizes are checked from the zip directory before anything is decompressed and again while
    decompressing, since the directory can lie. ``max_seconds`` and ``max_memory_bytes`` bound the child process
    each file is read in (``read_documents``); ``read_document``, which reads in the caller's process, cannot
    enforce them.
    """

    max_file_bytes: int = 128 * MiB  # one upload, as stored
    max_chars: int | None = 100_000_000  # extracted text of one read (all files of read_documents together)
    max_zip_members: int = 10_000
    max_unzipped_bytes: int = 512 * MiB  # all members of one archive, decompressed
    max_member_bytes: int = 64 * MiB  # one member, decompressed
    max_compression_ratio: float = 100.0  # decompressed total / archive size, books reach ~10
    ratio_floor_bytes: int = 16 * MiB  # archives expanding to less are harmless whatever their ratio
    max_seconds: float = 120.0  # wall time of one read (all files of read_documents together)
    max_memory_bytes: int = 4 * GiB  # address space of the process reading one file


class DocumentError(ValueError):
    """An upload could not be turned into a document; the message is shown to the user as is."""


class DocumentTooLong(DocumentError):
    """The text is longer than ``ReadLimits.max_chars``; reading stopped there."""

    def __init__(self, message: str, max_chars: int) -> None:
        super().__init__(message)
        self.max_chars = max_chars


@dataclass
class Chapter:
    title: str
    char_offset: int  # offset of the chapter start in Document.text


@dataclass
class Document:
    title: str
    text: str
    chapters: list[Chapter]
    files: list[str] = field(default_factory=list)  # file names (basename) in order
    warnings: list[str] = field(default_factory=list)  # what was damaged or guessed, "file: what", for people


@dataclass
class _Segment:
    """A run of text and the chapters that start where it starts (extractors split the text at chapters)."""

    titles: list[str]
    text: str


@dataclass
class _Reading:
    """One file being read: its name for messages, its limits, the warnings so far and the characters taken."""

    name: str
    limits: ReadLimits
    warnings: list[str] = field(default_factory=list)
    chars: int = 0

    def warn(self, message: str) -> None:
        self.warnings.append(f"{self.name}: {message}")

    def take(self, text: str) -> str:
        """Count extracted text against ``max_chars``; raise as soon as it is exceeded."""
        self.chars += len(text)
        limit = self.limits.max_chars
        if limit is not None and self.chars > limit:
            raise DocumentTooLong(
                f"{self.name!r} has more than {limit:,} characters of text, the most this read may take; "
                "upload a shorter document or a part of it.",
                limit,
            )
        return text


_REPAIR_HINTS = {
    ".epub": "check that it is a complete, DRM-free .epub file",
    ".pdf": "check that it is a complete, unencrypted .pdf file",
}


def _repair_hint(suffix: str) -> str:
    return _REPAIR_HINTS.get(suffix, f"check that it is a complete {suffix} file")


_FORMAT_NAMES = {
    ".txt": "text",
    ".md": "Markdown",
    ".epub": "EPUB",
    ".pdf": "PDF",
    ".html": "HTML",
    ".htm": "HTML",
}


def read_document(path: str | Path, limits: ReadLimits = ReadLimits(), name: str | None = None) -> Document:
    """Read one uploaded file, choosing the extractor by its suffix; any failure is a ``DocumentError``.

    ``name`` is what the file is called in its title, ``files`` and messages: its owner's name for it, where that
    differs from the path's (an upload stored under a sanitized name); the path's name by default. The extractor
    is always chosen by the path's suffix. This reads in the caller's process, unbounded in time and memory: read
    a file you did not make with ``read_documents``, which runs this in a child process.
    """
    path = Path(path)
    name = name or path.name
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DocumentError(
            f"{name!r} has an unsupported file type {suffix or '(no suffix)'!r}; "
            f"supported types are {', '.join(SUPPORTED_SUFFIXES)} - convert the file to one of them."
        )
    if not path.is_file():
        raise DocumentError(f"{name!r} was not found (looked for {str(path)!r}); upload the file again.")
    try:
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            raise DocumentError(
                f"{name!r} is {size / MiB:,.1f} MiB; the most one upload may be is "
                f"{limits.max_file_bytes / MiB:,.0f} MiB - upload a smaller file or split the book."
            )
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(
            f"{name!r} could not be read ({exc.strerror or exc}); upload the file again."
        ) from exc

    reading = _Reading(name, limits)
    try:
        title, text, chapters = _READERS[suffix](data, reading)
    except (DocumentError, MemoryError):  # out of memory is no parse failure: ``_read_apart`` says what it is
        raise
    except (
        Exception
    ) as exc:  # the libraries and the data raise many kinds; the user gets one kind, with a cause
        raise DocumentError(
            f"{name!r} could not be parsed as {_FORMAT_NAMES[suffix]} "
            f"({type(exc).__name__}: {_one_line(str(exc))[:200]}); {_repair_hint(suffix)}."
        ) from exc
    if not text.strip():
        hint = (
            "it is probably a scanned PDF without a text layer; "
            "run OCR on it (e.g. with ocrmypdf) and upload the result"
            if suffix == ".pdf"
            else "upload a file that contains the book's text"
        )
        found = f" ({'; '.join(reading.warnings[:3])})" if reading.warnings else ""
        raise DocumentError(f"{name!r} contains no text after extraction{found}; {hint}.")
    return Document(
        title=_usable_title(title) or Path(name).stem,
        text=text,
        chapters=chapters,
        files=[name],
        warnings=reading.warnings,
    )


def read_documents(
    paths: Sequence[str | Path], limits: ReadLimits = ReadLimits(), names: Sequence[str] | None = None
) -> Document:
    """Read files (uploads) as one document so questions can span them; each file becomes a headed chapter.

    Each file is read by ``read_document`` in a child process of its own (``_read_apart``), within
    ``limits.max_memory_bytes``; ``limits.max_seconds`` and ``limits.max_chars`` bound all files together.
    ``names``, one per path, are the files' names as ``read_document`` takes them (the paths' names by default).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DocumentError(f"No files were given; upload at least one {', '.join(SUPPORTED_SUFFIXES)} file.")
    if names is None:
        names = [Path(path).name for path in paths]
    docs: list[Document] = []
    used = 0
    deadline = time.monotonic() + limits.max_seconds
    for path, name in zip(paths, names, strict=True):
        file_limits = limits
        if limits.max_chars is not None:
            file_limits = replace(limits, max_chars=limits.max_chars - used)
        try:
            docs.append(_read_apart(path, file_limits, name, deadline))
        except DocumentTooLong as exc:
            if not docs:
                raise
            raise DocumentTooLong(
                f"The files together have more than {limits.max_chars:,} characters of text, the most this "
                f"read may take (reached in {name!r}); upload fewer or shorter files.",
                exc.max_chars,
            ) from exc
        used += len(docs[-1].text) + len(f"# {docs[-1].files[0]}\n\n\n\n")
    if len(docs) == 1:
        return docs[0]

    parts: list[str] = []
    chapters: list[Chapter] = []
    offset = 0
    for doc in docs:
        name = doc.files[0]
        heading = f"# {name}\n\n"
        chapters.append(Chapter(name, offset))
        chapters.extend(Chapter(c.title, offset + len(heading) + c.char_offset) for c in doc.chapters)
        parts.append(heading + doc.text)
        offset += len(parts[-1]) + len("\n\n")
    names = [doc.files[0] for doc in docs]
    return Document(
        title=" + ".join(names),
        text="\n\n".join(parts),
        chapters=chapters,
        files=names,
        warnings=[warning for doc in docs for warning in doc.warnings],
    )


# --- reading in a child process ----------------------------------------------------------------------------

# A fresh interpreter, not a fork: the parent may hold a model and threads mid-work. Isolated mode (-I) keeps the
# environment and the current directory out of its imports; this package's own root goes first on its path, so
# the child runs the same code as its parent.
_CHILD_COMMAND = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from duo_qserve.documents import _serve_parent; _serve_parent()"
)


def _read_apart(path: str | Path, limits: ReadLimits, name: str, deadline: float) -> Document:
    """``read_document(path, limits, name)`` in a child process, killed at ``deadline`` (``time.monotonic``) and
    unable to take more than ``limits.max_memory_bytes``. The outcome comes back as JSON, plain data, because the
    child has handled hostile input. Raises what ``read_document`` raises, and a ``DocumentError`` naming the file
    when the read ran out of time or memory or its process died."""
    request = json.dumps({"path": os.fspath(path), "name": name, "limits": asdict(limits)})
    command = _CHILD_COMMAND.format(root=str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryFile() as result:  # a file, not a pipe: a full pipe would stall the child
        child = subprocess.Popen([sys.executable, "-I", "-c", command], stdin=subprocess.PIPE, stdout=result)
        try:
            child.communicate(request.encode(), timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise DocumentError(_out_of_time(name, limits)) from None
        finally:
            if child.poll() is None:  # out of time, or the caller was interrupted: the read ends with it
                child.kill()
                child.wait()
        result.seek(0)
        return _outcome(result.read(), child.returncode, path, name, limits)


def _outcome(result: bytes, returncode: int, path: str | Path, name: str, limits: ReadLimits) -> Document:
    """The document a child of ``_read_apart`` wrote, or its error raised; a child that wrote nothing died."""
    try:
        outcome = json.loads(result.decode("utf-8", "surrogatepass"))
        kind = outcome["kind"]
    except (ValueError, TypeError, KeyError):
        kind = None
    if kind == "document":
        fields = outcome["document"]
        return Document(**{**fields, "chapters": [Chapter(**chapter) for chapter in fields["chapters"]]})
    if kind == "too_long":
        raise DocumentTooLong(outcome["message"], outcome["max_chars"])
    if kind == "refused":
        raise DocumentError(outcome["message"])
    if kind == "out_of_memory":
        raise DocumentError(
            f"{name!r} needs more than {limits.max_memory_bytes / MiB:,.0f} MiB of memory to read, the most one "
            "file may take: it is probably a decompression bomb or otherwise hostile - upload a genuine copy, "
            "or the book in smaller parts."
        )
    if returncode == -signal.SIGXCPU:  # the child's own CPU limit (``_serve_parent``) ended it
        raise DocumentError(_out_of_time(name, limits))
    how = f"signal {signal.Signals(-returncode).name}" if returncode < 0 else f"exit status {returncode}"
    raise DocumentError(
        f"{name!r} could not be read: its reader stopped ({how}); the file is probably damaged or hostile - "
        f"{_repair_hint(Path(path).suffix.lower())}."
    )


def _out_of_time(name: str, limits: ReadLimits) -> str:
    return (
        f"{name!r} was not read within {limits.max_seconds:g} s, the most this read may take (a book reads in "
        "seconds): it is probably damaged or built to stall readers - upload a repaired copy, or the book's text "
        "as .txt."
    )


def _serve_parent() -> None:
    """The child process of ``_read_apart``: take its request (JSON) from stdin, bound this process's memory and
    CPU time, read the file, and write the outcome as JSON to stdout."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what a library prints goes to stderr, never into the outcome
    request = json.load(sys.stdin)
    limits = ReadLimits(**request["limits"])
    _lower_limit(resource.RLIMIT_AS, limits.max_memory_bytes)
    # the parent kills this process at its deadline; the CPU limit ends it too should the parent die first
    _lower_limit(resource.RLIMIT_CPU, math.ceil(limits.max_seconds) + 1)
    try:
        doc = read_document(request["path"], limits, request["name"])
        outcome = json.dumps({"kind": "document", "document": asdict(doc)}, ensure_ascii=False)
        encoded = outcome.encode("utf-8", "surrogatepass")  # text is text as extracted, lone surrogates too
    except DocumentTooLong as exc:
        encoded = json.dumps({"kind": "too_long", "message": str(exc), "max_chars": exc.max_chars}).encode()
    except DocumentError as exc:
        encoded = json.dumps({"kind": "refused", "message": str(exc)}).encode()
    except MemoryError:  # what failed to fit is gone with the frames that held it: this much fits
        encoded = b'{"kind": "out_of_memory"}'
    out.write(encoded)
    out.close()


def _lower_limit(which: int, limit: int) -> None:
    """Lower this process's soft ``resource`` limit ``which`` to ``limit`` (or to its hard limit, if lower)."""
    _soft, hard = resource.getrlimit(which)
    resource.setrlimit(which, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def document_from_text(text: str, title: str = "Pasted text") -> Document:
    """Wrap pasted text as a document; chapters come from Markdown headings, else from "Chapter N" lines."""
    text = _normalise(text)
    if not text:
        raise DocumentError("The pasted text is empty; paste the book's text or upload a file.")
    return Document(title=title, text=text, chapters=_markdown_chapters(text) or _text_chapters(text))


def chapter_token_offsets(doc: Document, tokenizer: Any) -> list[tuple[str, int]]:
    """Map each chapter to its token index in ``tokenizer(doc.text, add_special_tokens=False)``.

    Tokenizing chapters one by one would drift where tokens merge across chapter boundaries, so the offsets
    come from the one whole-text encoding. A chapter that starts inside a token maps to that token.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "chapter_token_offsets needs a fast (Rust-backed) tokenizer for return_offsets_mapping."
        )
    encoding = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    token_ends = [end for _start, end in encoding["offset_mapping"]]
    return [(c.title, bisect.bisect_right(token_ends, c.char_offset)) for c in doc.chapters]


# --- whitespace, titles and assembly ------------------------------------------------------------------------

_MAX_TITLE_CHARS = 120


def _normalise(text: str) -> str:
    """Unify line ends, strip trailing spaces and collapse 3+ blank lines to 2; nothing else changes."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


def _one_line(text: str) -> str:
    """Collapse all whitespace, for titles and for library error texts inside one-line messages."""
    return " ".join(text.split())


def _clip_title(text: str) -> str:
    title = _one_line(text)
    return title if len(title) <= _MAX_TITLE_CHARS else title[: _MAX_TITLE_CHARS - 1].rstrip() + "\u2026"


# Metadata titles that name no book: placeholders and the authoring tool's file name.
_PLACEHOLDER_TITLES = frozenset(
    {"untitled", "anonymous", "unknown", "none", "null", "title", "document", "no title", "new document"}
)
_TOOL_PREFIXES = ("microsoft word - ", "microsoft powerpoint - ", "microsoft excel - ")
_FILE_SUFFIXES = frozenset("doc docx odt rtf pdf txt tex dvi ps indd qxd pages htm html epub md".split())


def _usable_title(raw: str) -> str:
    """The title from a file's metadata, or "" when it is empty or junk, so the file name is used instead."""
    title = _clip_title(raw)
    folded = title.casefold()
    if (
        not any(char.isalpha() for char in title)
        or folded.strip(" ()[]-_.0123456789") in _PLACEHOLDER_TITLES
        or folded.startswith(_TOOL_PREFIXES)
        or ("." in folded and folded.rsplit(".", 1)[1] in _FILE_SUFFIXES)
    ):
        return ""
    return title


def _assemble(segments: Sequence[_Segment]) -> tuple[str, list[Chapter]]:
    """Join segments with paragraph breaks, each chapter at its segment's start.

    Chapters of an empty segment (a bookmark on a blank page, an anchor right before another) start where the
    next text does; those with no text after them are dropped.
    """
    parts: list[str] = []
    chapters: list[Chapter] = []
    pending: list[str] = []
    length = 0
    for segment in segments:
        pending.extend(segment.titles)
        text = _normalise(segment.text)
        if not text:
            continue
        if parts:
            length += len("\n\n")
        chapters.extend(Chapter(title, length) for title in pending)
        pending.clear()
        parts.append(text)
        length += len(text)
    return "\n\n".join(parts), chapters


# --- decoding -----------------------------------------------------------------------------------------------

_BOMS = (  # UTF-32-LE before UTF-16-LE: its mark starts with the other's
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_UNREADABLE_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ue000-\uf8ff\ufffd]")
_ASCII_BYTES = bytes(range(128))
# Only ever applied to a file's first KiB.
_DECLARED_CHARSET = re.compile(rb"""(?:charset|encoding)[ \t]*=[ \t]*["']?([A-Za-z0-9_.:-]{1,40})""", re.I)


def _declared_charset(data: bytes) -> str | None:
    """The 8-bit encoding an HTML/XML file declares in its first KiB (meta charset, XML declaration), if known."""
    match = _DECLARED_CHARSET.search(data[:1024])
    if not match:
        return None
    try:
        codec = codecs.lookup(match.group(1).decode("ascii"))
    except LookupError:
        return None
    return None if codec.name.startswith(("utf-16", "utf-32")) else codec.name


def _wide_encoding(data: bytes) -> str | None:
    """UTF-32 or UTF-16 without a byte-order mark, recognised by where its NUL bytes sit."""
    sample = data[:65536]
    if len(sample) < 4:
        return None
    if len(data) % 4 == 0:
        units = [sample[i::4] for i in range(4)]
        zeros = [unit.count(0) for unit in units]
        if zeros[3] == len(units[3]) and zeros[2] >= len(units[2]) // 2 and zeros[0] < len(units[0]) // 2:
            return "utf-32-le"
        if zeros[0] == len(units[0]) and zeros[1] >= len(units[1]) // 2 and zeros[3] < len(units[3]) // 2:
            return "utf-32-be"
    if len(data) % 2 == 0:
        odd, even = sample[1::2], sample[0::2]
        if odd.count(0) >= len(odd) // 2 and even.count(0) == 0:
            return "utf-16-le"
        if even.count(0) >= len(even) // 2 and odd.count(0) == 0:
            return "utf-16-be"
    return None


def _decode_text(
    data: bytes, reading: _Reading, member: str | None = None, declared: str | None = None
) -> str:
    """Decode text bytes by the module's rule; refuse binary data; warn about replaced or guessed bytes.

    ``member`` names the bytes inside an archive, for messages; None for the uploaded file itself.
    """
    what = f"{member!r} in {reading.name!r}" if member else repr(reading.name)
    subject = repr(member) if member else "it"
    binary = (
        f"{what} looks like binary data, not text; upload the book's text as .txt, .md or .html "
        "(or an .epub or .pdf file)."
    )
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            text = data[len(bom) :].decode(encoding, errors="replace")
            break
    else:
        encoding = _wide_encoding(data)
        if encoding:
            text = data.decode(encoding, errors="replace")
            reading.warn(f"{subject} has no byte-order mark and was read as {encoding.upper()}.")
        elif b"\x00" in data:
            raise DocumentError(binary)
        else:
            text = data.decode("utf-8", errors="replace")
            encoding = "utf-8"
            invalid = text.count("\ufffd")
            valid_multibyte = len(text) - (len(data) - len(data.translate(None, _ASCII_BYTES))) - invalid
            if invalid and declared and declared != "utf-8":
                encoding = declared
                text = data.decode(declared, errors="replace")
            elif invalid > valid_multibyte:
                try:
                    encoding, text = "cp1252", data.decode("cp1252")
                except UnicodeDecodeError:
                    encoding, text = "latin-1", data.decode("latin-1")
                reading.warn(
                    f"{subject} is not UTF-8 and was read as {encoding.upper()}; if its text looks garbled, "
                    "save it as UTF-8 and upload it again."
                )
    unreadable = len(text) - len(_UNREADABLE_CHARS.sub("", text))
    if unreadable > BINARY_CHAR_RATIO * len(text):
        raise DocumentError(binary)
    if replaced := text.count("\ufffd"):
        reading.warn(
            f"{member + ': ' if member else ''}{replaced:,} byte sequence(s) that are not valid {encoding.upper()} were replaced "
            "with \ufffd."
        )
    return text


# --- plain text and Markdown --------------------------------------------------------------------------------

_MAX_HEADING_LINE = 200
_NUMBER_WORD = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|"
    "seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred"
)
# Lines that may be headings: short, starting (after a little indentation) with chapter/part or a digit.
# Every quantifier is bounded, so each line start costs at most ~200 steps.
_HEADING_CANDIDATE = re.compile(
    rf"^[ \t]{{0,20}}(?:chapter|part|\d)[^\n]{{0,{_MAX_HEADING_LINE}}}$", re.IGNORECASE | re.MULTILINE
)
# Applied with fullmatch to one stripped candidate line. "Chapter <number>" or "Part <number>", optionally
# followed by punctuation and a name: "CHAPTER IV.", "Chapter 3: The Storm", "Part Two - Home". A name needs
# the punctuation, so that a wrapped sentence line such as "chapter 3 shows that" is not taken for a heading.
_CHAPTER_HEADING = re.compile(
    rf"(?:chapter|part)[ \t]+(?:\d{{1,4}}|[ivxlcdm]{{1,12}}|(?:{_NUMBER_WORD})(?:[- ](?:{_NUMBER_WORD}))?)"
    r"(?:[ \t]*[:.\-\u2013\u2014](?:[ \t]*\S.*)?)?",
    re.IGNORECASE,
)
# "1 Introduction", "2. Related Work": a number, a capitalised name of a few words, no final punctuation.
_NUMBERED_HEADING = re.compile(r"(\d{1,3})\.?[ \t]+([A-Z][^.,;:!?]{0,78}[^.,;:!?\d\s])")
_MAX_NUMBERED_WORDS = 10


class _HeadingLine(NamedTuple):
    line_start: int
    line_end: int
    title: str
    offset: int  # where the heading's text starts (after indentation)


def _text_chapters(text: str) -> list[Chapter]:
    """Chapter starts of plain text (txt, pasted text, PDF without outline).

    Whole lines naming a chapter or part come first; when there are none, numbered headings ("1 Introduction")
    count, but only those numbered 1, 2, 3, ... in order whose names do not repeat (running page headers do).
    Runs of adjacent heading lines are a table of contents, not headings, and are skipped; a heading repeating
    the one before it (a running header) is skipped too.
    """
    named: list[_HeadingLine] = []
    numbered: list[tuple[int, _HeadingLine]] = []
    for match in _HEADING_CANDIDATE.finditer(text):
        line = match.group()
        stripped = line.strip()
        offset = match.start() + len(line) - len(line.lstrip())
        heading = _HeadingLine(match.start(), match.end(), _one_line(stripped), offset)
        if _CHAPTER_HEADING.fullmatch(stripped):
            named.append(heading)
        elif (number := _NUMBERED_HEADING.fullmatch(stripped)) and len(
            number.group(2).split()
        ) <= _MAX_NUMBERED_WORDS:
            numbered.append((int(number.group(1)), heading._replace(title=_one_line(stripped))))

    headings = _outside_contents(named)
    if not headings:
        names = Counter(h.title.split(" ", 1)[1] for _, h in numbered)
        expected = 1
        for number, heading in numbered:
            if number == expected and names[heading.title.split(" ", 1)[1]] == 1:
                headings.append(heading)
                expected += 1
        headings = _outside_contents(headings) if len(headings) >= 2 else []
    chapters: list[Chapter] = []
    for heading in headings:
        if not chapters or chapters[-1].title != heading.title:
            chapters.append(Chapter(_clip_title(heading.title), heading.offset))
    return chapters


def _outside_contents(headings: list[_HeadingLine]) -> list[_HeadingLine]:
    """Drop headings on adjacent lines: such runs are a table of contents."""
    in_contents: set[int] = set()
    for i in range(len(headings) - 1):
        if headings[i + 1].line_start == headings[i].line_end + 1:
            in_contents.update((i, i + 1))
    return [heading for i, heading in enumerate(headings) if i not in in_contents]


_MD_LINE_OF_INTEREST = re.compile(r"^(?:#|[ \t]{0,3}(?:```|~~~))", re.MULTILINE)


def _markdown_heading(line: str) -> str | None:
    """The title of a ``#`` or ``##`` ATX heading line, else None (string operations, linear in the line)."""
    level = len(line) - len(line.lstrip("#"))
    rest = line[level:]
    if level not in (1, 2) or not rest or rest[0] not in " \t":
        return None
    content = rest.strip(" \t")
    without_closing = content.rstrip("#")
    if without_closing != content and (not without_closing or without_closing[-1] in " \t"):
        content = without_closing.rstrip(" \t")
    return _clip_title(content) or None


def _markdown_chapters(text: str) -> list[Chapter]:
    """Find ``#`` and ``##`` headings outside fenced code blocks (where ``#`` is often a comment)."""
    chapters = []
    in_fence = False
    for match in _MD_LINE_OF_INTEREST.finditer(text):
        if match.group() != "#":
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        end = text.find("\n", match.start())
        title = _markdown_heading(text[match.start() : len(text) if end < 0 else end])
        if title:
            chapters.append(Chapter(title, match.start()))
    return chapters


def _read_txt(data: bytes, reading: _Reading) -> tuple[str, str, list[Chapter]]:
    text = _normalise(reading.take(_decode_text(data, reading)))
    return "", text, _text_chapters(text)


def _read_md(data: bytes, reading: _Reading) -> tuple[str, str, list[Chapter]]:
    text = _normalise(reading.take(_decode_text(data, reading)))
    return "", text, _markdown_chapters(text)


# --- markup tokenizer ---------------------------------------------------------------------------------------


class _Tag(NamedTuple):
    name: str  # local name, lower case ("dc:title" -> "title")
    attrs: dict[str, str]  # lower-case names with prefix ("epub:type"), unescaped values
    closing: bool
    self_closing: bool


_TAG_NAME = re.compile(r"[A-Za-z][^\s/>]*")
_SIMPLE_TAG = re.compile(r"<(/?)([A-Za-z][^\s/>]*)[ \t\n\r\f]*(/?)>")  # disjoint classes: no backtracking
_TAG_GAP = re.compile(r"[\s/]*")
# An unclosed quote makes the quoted alternative scan to the end once; it can only fail when no such quote
# follows, so it fails at most once per quote character and the scan stays linear overall.
_ATTRIBUTE = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]*))?""")
_RAW_TEXT_END = {
    name: re.compile(rf"</{name}", re.IGNORECASE) for name in ("script", "style", "title", "textarea")
}


def _unescape(text: str) -> str:
    if "&" not in text:
        return text
    try:
        return html.unescape(text)
    except ValueError:  # a numeric reference longer than int() accepts: keep the text as written
        return text


def _read_tag(markup: str, name: re.Match[str], closing: bool) -> tuple[_Tag, str, int]:
    """Parse one tag from its name on; return it, its raw name and the position after it."""
    raw_name = name.group().lower()
    attrs: dict[str, str] = {}
    pos, end = name.end(), len(markup)
    self_closing = False
    while True:
        pos = _TAG_GAP.match(markup, pos).end()  # type: ignore[union-attr]  # matches the empty string
        if pos >= end:
            break
        if markup[pos] == ">":
            self_closing = markup[pos - 1] == "/"
            pos += 1
            break
        attribute = _ATTRIBUTE.match(markup, pos)
        if attribute is None:  # a stray quote or "=": skip it as browsers do
            pos += 1
            continue
        value = attribute.group(2) or ""
        if value[:1] in ("'", '"'):
            value = value[1:-1]
        attrs.setdefault(attribute.group(1).lower(), _unescape(value))
        pos = attribute.end()
    return _Tag(raw_name.rpartition(":")[2], attrs, closing, self_closing), raw_name, pos


def _raw_text(markup: str, raw_name: str, pos: int) -> Iterator[str]:
    """The raw text of a script, style, title or textarea element; returns where its end tag starts."""
    close_tag = _RAW_TEXT_END[raw_name].search(markup, pos)
    stop = close_tag.start() if close_tag else len(markup)
    content = markup[pos:stop]
    yield content if raw_name in ("script", "style") else _unescape(content)
    return stop


def _markup_events(markup: str, warn: Callable[[str], None]) -> Iterator[str | _Tag]:
    """Tags and unescaped text of HTML, XHTML or XML, in one linear pass with no tree and no recursion.

    Comments, doctypes and processing instructions are skipped; CDATA sections are text; script, style,
    title and textarea hold raw text up to their end tag. Damage is read the way browsers read it.
    """
    pos, end = 0, len(markup)
    while pos < end:
        lt = markup.find("<", pos)
        if lt < 0:
            lt = end
        if lt > pos:
            yield _unescape(markup[pos:lt])
        if lt >= end:
            break
        if markup.startswith("<!--", lt):
            close = markup.find("-->", lt + 4)
            if close < 0:
                warn("an unclosed <!-- comment hides the rest of its text.")
                break
            pos = close + 3
        elif markup.startswith("<![CDATA[", lt):
            close = markup.find("]]>", lt + 9)
            stop = end if close < 0 else close
            yield markup[lt + 9 : stop]
            pos = stop + 3
        elif markup.startswith(("<!", "<?"), lt) or (
            markup.startswith("</", lt) and not _TAG_NAME.match(markup, lt + 2)
        ):
            close = markup.find(">", lt + 2)
            pos = end if close < 0 else close + 1
        elif simple := _SIMPLE_TAG.match(markup, lt):  # most tags: no attributes, read in one match
            closing, raw_name, slash = simple.groups()
            raw_name = raw_name.lower()
            tag = _Tag(raw_name.rpartition(":")[2], {}, bool(closing), bool(slash))
            pos = simple.end()
            yield tag
            if not tag.closing and not tag.self_closing and raw_name in _RAW_TEXT_END:
                pos = yield from _raw_text(markup, raw_name, pos)
        elif name := _TAG_NAME.match(markup, lt + 2 if markup.startswith("</", lt) else lt + 1):
            tag, raw_name, pos = _read_tag(markup, name, markup.startswith("</", lt))
            yield tag
            if not tag.closing and not tag.self_closing and raw_name in _RAW_TEXT_END:
                pos = yield from _raw_text(markup, raw_name, pos)
        else:  # "a < b": a literal "<"
            yield "<"
            pos = lt + 1


# --- HTML text ----------------------------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    "address article aside blockquote body caption dd div dl dt figcaption figure footer form "
    "h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table td th tr ul".split()
)
_HIDDEN_TAGS = frozenset({"script", "style", "noscript", "template", "title"})
_VOID_TAGS = frozenset("area base br col embed hr img input link meta param source track wbr".split())
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")  # HTML whitespace only; a no-break space stays


class _Open(NamedTuple):
    name: str
    is_block: bool
    hides: bool
    is_pre: bool
    reads_title: bool  # the heading whose text becomes its chapter's title


class _HtmlText:
    """Collect the visible text of HTML, starting a new segment at each chapter.

    Whitespace collapses as in a browser (except inside <pre>), block elements become paragraph breaks and
    <br> a line break. A chapter starts at a heading in ``heading_tags`` or at an element whose id is in
    ``anchors`` (id -> chapter title, used for EPUB table-of-contents links). Open elements are an explicit
    stack, so nesting depth costs nothing but the stack; an end tag closes the elements opened after its own.
    """

    def __init__(
        self, reading: _Reading, heading_tags: frozenset[str], anchors: dict[str, str] | None = None
    ) -> None:
        self.title = ""  # of the first <title>
        self._reading = reading
        self._heading_tags = heading_tags
        self._anchors = anchors or {}
        self._segments: list[tuple[list[str], list[str]]] = [([], [])]
        self._at_line_start = True
        self._open: list[_Open] = []
        self._open_names: Counter[str] = Counter()
        self._hidden = 0
        self._pre = 0
        self._heading: list[str] | None = None  # text of the heading being read, while it is open
        self._title: list[str] | None = None

    def feed(self, markup: str) -> None:
        for event in _markup_events(markup, self._reading.warn):
            if isinstance(event, str):
                self._text(event)
            elif event.closing:
                self._end(event.name)
            else:
                self._start(event)
        while self._open:
            self._close(self._open.pop())

    def segments(self) -> list[_Segment]:
        return [_Segment(titles, "".join(pieces)) for titles, pieces in self._segments]

    def _start(self, tag: _Tag) -> None:
        name = tag.name
        empty = tag.self_closing or name in _VOID_TAGS
        entry = _Open(name, False, name in _HIDDEN_TAGS, name == "pre", False)
        if not self._hidden and not entry.hides:
            anchor = tag.attrs.get("id") or (tag.attrs.get("name") if name == "a" else None)
            title = self._anchors.get(anchor) if anchor else None
            reads_title = not title and not empty and name in self._heading_tags and self._heading is None
            if title or reads_title:
                self._segments.append(([title] if title else [], []))
                self._at_line_start = True
            if reads_title:
                self._heading = []
            if name == "br":
                self._break("\n")
            entry = entry._replace(is_block=name in _BLOCK_TAGS, reads_title=reads_title)
            if entry.is_block:
                self._break("\n\n")
        elif name == "title" and not self.title and self._title is None and not empty:
            self._title = []
        if empty:
            if entry.is_block:
                self._break("\n\n")
            return
        self._open.append(entry)
        self._open_names[name] += 1
        self._hidden += entry.hides
        self._pre += entry.is_pre

    def _end(self, name: str) -> None:
        if not self._open_names[name]:
            return  # a stray end tag
        while True:
            entry = self._open.pop()
            self._close(entry)
            if entry.name == name:
                return

    def _close(self, entry: _Open) -> None:
        self._open_names[entry.name] -= 1
        self._hidden -= entry.hides
        self._pre -= entry.is_pre
        if entry.name == "title" and self._title is not None:
            self.title = _clip_title(" ".join(self._title))
            self._title = None
        if entry.reads_title and self._heading is not None:
            if title := _clip_title(" ".join(self._heading)):
                self._segments[-1][0].append(title)
            self._heading = None
        if entry.is_block:
            self._break("\n\n")

    def _text(self, text: str) -> None:
        if self._title is not None:
            self._title.append(text[: 2 * _MAX_TITLE_CHARS])
        if self._hidden:
            return
        if self._heading is not None and sum(map(len, self._heading)) < 2 * _MAX_TITLE_CHARS:
            self._heading.append(text[: 2 * _MAX_TITLE_CHARS])
        pieces = self._segments[-1][1]
        if not self._pre:
            text = _HTML_SPACE.sub(" ", text)
            if self._at_line_start:
                text = text.lstrip(" ")
            elif text.startswith(" ") and pieces and pieces[-1].endswith(" "):
                text = text[1:]
        if text:
            pieces.append(self._reading.take(text))
            self._at_line_start = text.endswith("\n")

    def _break(self, newlines: str) -> None:
        pieces = self._segments[-1][1]
        if pieces and pieces[-1].isspace():  # nested blocks share one break
            pieces[-1] = max(pieces[-1], newlines, key=len)
        elif pieces:
            pieces.append(newlines)
        self._at_line_start = True


def _read_html(data: bytes, reading: _Reading) -> tuple[str, str, list[Chapter]]:
    markup = _decode_text(data, reading, declared=_declared_charset(data))
    collector = _HtmlText(reading, heading_tags=frozenset({"h1", "h2", "h3"}))
    collector.feed(markup)
    return collector.title, *_assemble(collector.segments())


# --- EPUB ---------------------------------------------------------------------------------------------------


class _Archive:
    """A zip archive read within ``ReadLimits``.

    Member count, sizes and the compression ratio are checked from the zip directory before anything is
    decompressed, and each member's size again while it is decompressed, because the directory can lie.
    """

    def __init__(self, data: bytes, reading: _Reading) -> None:
        limits, name = reading.limits, reading.name
        refuse = "it is probably a zip bomb, not an e-book; upload a genuine .epub file"
        declared = _declared_member_count(data)
        if declared is not None and declared > limits.max_zip_members:
            raise DocumentError(
                f"{name!r} holds {declared:,} files, more than the {limits.max_zip_members:,} accepted; {refuse}."
            )
        self._zip = zipfile.ZipFile(io.BytesIO(data))
        infos = self._zip.infolist()
        if len(infos) > limits.max_zip_members:
            raise DocumentError(
                f"{name!r} holds {len(infos):,} files, more than the {limits.max_zip_members:,} accepted; {refuse}."
            )
        total = sum(info.file_size for info in infos)
        expands_too_far = total > limits.ratio_floor_bytes and total > limits.max_compression_ratio * len(
            data
        )
        if total > limits.max_unzipped_bytes or expands_too_far:
            raise DocumentError(
                f"{name!r} would expand to {total / MiB:,.1f} MiB, {total / max(len(data), 1):,.0f} times its "
                f"size (at most {limits.max_unzipped_bytes / MiB:,.0f} MiB and "
                f"{limits.max_compression_ratio:,.0f} times are accepted); {refuse}."
            )
        for info in infos:
            if info.file_size > limits.max_member_bytes:
                raise DocumentError(
                    f"{name!r} holds {info.filename!r} of {info.file_size / MiB:,.1f} MiB decompressed, more "
                    f"than the {limits.max_member_bytes / MiB:,.0f} MiB accepted for one file; {refuse}."
                )
        self.members = {info.filename: info for info in infos}
        self._reading = reading
        self._unzipped = 0

    def read(self, member: str) -> bytes:
        info = self.members[member]
        limits = self._reading.limits
        chunks: list[bytes] = []
        size = 0
        with self._zip.open(info) as file:
            while chunk := file.read(MiB):
                size += len(chunk)
                self._unzipped += len(chunk)
                if size > info.file_size or self._unzipped > limits.max_unzipped_bytes:
                    raise DocumentError(
                        f"{self._reading.name!r}: {member!r} decompresses to more than the "
                        f"{info.file_size:,} bytes its zip header states; the file is damaged or hostile "
                        "and was refused - upload a genuine .epub file."
                    )
                chunks.append(chunk)
        return b"".join(chunks)


def _declared_member_count(data: bytes) -> int | None:
    """The member count in the zip's end record, read before zipfile builds an entry per member."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 65_557))
    if at < 0 or at + 22 > len(data):
        return None
    count = int.from_bytes(data[at + 10 : at + 12], "little")
    return None if count == 0xFFFF else count  # 0xFFFF: a ZIP64 count, which zipfile reads itself


def _resolve(base_dir: str, href: str) -> tuple[str | None, str]:
    """(archive path, fragment) of an href relative to ``base_dir``; path None when it leaves the archive."""
    file, _, fragment = href.strip().partition("#")
    file = unquote(file)
    if not file or "://" in file or file.startswith("/") or ":" in file.split("/", 1)[0]:
        return None, unquote(fragment)
    path = posixpath.normpath(posixpath.join(base_dir, file))
    return (None if path == ".." or path.startswith("../") else path), unquote(fragment)


class _Item(NamedTuple):
    href: str
    path: str | None
    media_type: str
    properties: frozenset[str]


@dataclass
class _Package:
    title: str = ""
    manifest: dict[str, _Item] = field(default_factory=dict)
    spine: list[str] = field(default_factory=list)
    ncx_id: str = ""


def _read_package(markup: str, base_dir: str, warn: Callable[[str], None]) -> _Package:
    """Title, manifest and spine of an OPF package document."""
    package = _Package()
    title: list[str] | None = None
    for event in _markup_events(markup, warn):
        if isinstance(event, str):
            if title is not None and len(title) < 64:
                title.append(event)
        elif event.closing:
            if event.name == "title" and title is not None:
                package.title, title = _one_line(" ".join(title)), None
        elif event.name == "title" and not package.title and not event.self_closing:
            title = []
        elif event.name == "item" and "id" in event.attrs:
            href = event.attrs.get("href", "")
            package.manifest[event.attrs["id"]] = _Item(
                href,
                _resolve(base_dir, href)[0],
                event.attrs.get("media-type", "").lower(),
                frozenset(event.attrs.get("properties", "").split()),
            )
        elif event.name == "itemref" and event.attrs.get("idref"):
            package.spine.append(event.attrs["idref"])
        elif event.name == "spine":
            package.ncx_id = event.attrs.get("toc", "")
    return package


def _nav_entries(markup: str, warn: Callable[[str], None]) -> list[tuple[str, str]]:
    """(href, title) links of an EPUB 3 navigation document: its toc nav, else its first nav with links."""
    navs: list[tuple[bool, list[tuple[str, str]]]] = []
    link: tuple[str, list[str]] | None = None
    in_nav = 0
    for event in _markup_events(markup, warn):
        if isinstance(event, str):
            if link is not None and len(link[1]) < 64:
                link[1].append(event)
        elif event.name == "nav" and not event.self_closing:
            if event.closing:
                in_nav = max(0, in_nav - 1)
            else:
                in_nav += 1
                is_toc = any(key.endswith("type") and "toc" in value for key, value in event.attrs.items())
                navs.append((is_toc, []))
        elif event.name == "a" and in_nav:
            if event.closing and link is not None:
                navs[-1][1].append((link[0], _one_line(" ".join(link[1]))))
                link = None
            elif not event.closing and "href" in event.attrs:
                link = (event.attrs["href"], [])
    for _is_toc, entries in sorted(navs, key=lambda nav: not nav[0]):
        if entries:
            return entries
    return []


def _ncx_entries(markup: str, warn: Callable[[str], None]) -> list[tuple[str, str]]:
    """(href, title) points of an EPUB 2 NCX table of contents, in reading order."""
    entries: list[tuple[str, str]] = []
    label: list[str] | None = None
    last_label = ""
    for event in _markup_events(markup, warn):
        if isinstance(event, str):
            if label is not None and len(label) < 64:
                label.append(event)
        elif event.name == "navlabel":
            if event.closing and label is not None:
                last_label, label = _one_line(" ".join(label)), None
            elif not event.closing:
                label = []
        elif event.name == "content" and not event.closing and "src" in event.attrs:
            entries.append((event.attrs["src"], last_label))
    return entries


def _is_html(item: _Item) -> bool:
    return "html" in item.media_type or (item.path or "").lower().endswith((".xhtml", ".html", ".htm"))


class _Epub:
    """Reads one EPUB: the package, the reading order, the table of contents and the chapters' text."""

    def __init__(self, data: bytes, reading: _Reading) -> None:
        self.reading = reading
        self.archive = _Archive(data, reading)

    def member_text(self, path: str) -> str | None:
        """A member's decoded text, or None (with a warning) when it is missing, damaged or binary."""
        if path not in self.archive.members:
            self.reading.warn(f"{path!r} is listed but missing from the file; it was left out.")
            return None
        try:
            data = self.archive.read(path)
        except (DocumentError, MemoryError):
            raise
        except Exception as exc:  # zipfile and zlib raise many kinds for a damaged or encrypted member
            self.reading.warn(f"{path!r} could not be decompressed ({type(exc).__name__}); it was left out.")
            return None
        try:
            return _decode_text(data, self.reading, path, _declared_charset(data))
        except DocumentError:
            self.reading.warn(f"{path!r} looks like binary data, not text; it was left out.")
            return None

    def package(self) -> tuple[_Package, str]:
        """The package document and the directory its hrefs are relative to."""
        members = self.archive.members
        opf_path = None
        container = "META-INF/container.xml"
        if container in members and (markup := self.member_text(container)):
            for event in _markup_events(markup, self.reading.warn):
                if isinstance(event, _Tag) and event.name == "rootfile" and not event.closing:
                    candidate = event.attrs.get("full-path", "")
                    if candidate in members:
                        opf_path = candidate
                        break
        if opf_path is None:
            opf_path = next((name for name in members if name.lower().endswith(".opf")), None)
            if opf_path is not None:
                self.reading.warn(f"its container.xml names no package document; {opf_path!r} was used.")
        if opf_path is None or not (markup := self.member_text(opf_path)):
            return _Package(), ""
        base_dir = posixpath.dirname(opf_path)
        return _read_package(markup, base_dir, self.reading.warn), base_dir

    def chapter_paths(self, package: _Package) -> list[str]:
        """Archive paths of the chapters in reading order; what cannot be read is reported, never dropped."""
        items: list[_Item] = []
        for idref in package.spine:
            if idref in package.manifest:
                items.append(package.manifest[idref])
            else:
                self.reading.warn(
                    f"its reading order names {idref!r}, which is not in its manifest; skipped."
                )
        if not items:
            items = [item for item in package.manifest.values() if _is_html(item)]
            if items:
                self.reading.warn(
                    "it has no reading order (spine); its chapters were read in manifest order."
                )
        if not items:
            htmls = sorted(
                name for name in self.archive.members if name.lower().endswith((".xhtml", ".html", ".htm"))
            )
            if htmls:
                self.reading.warn(
                    "it has no usable package document; its HTML files were read in name order."
                )
            return htmls
        paths: list[str] = []
        for item in items:
            if "nav" in item.properties or not _is_html(item):
                continue
            if item.path is None:
                self.reading.warn(f"chapter {item.href!r} points outside the book; it was left out.")
            elif item.path not in paths:
                paths.append(item.path)
        return paths

    def toc(self, package: _Package, base_dir: str) -> dict[str, list[tuple[str, str]]]:
        """Table-of-contents titles by chapter path: (fragment, title), from the EPUB 3 nav, else the NCX."""
        nav = next((item for item in package.manifest.values() if "nav" in item.properties), None)
        ncx = package.manifest.get(package.ncx_id) or next(
            (item for item in package.manifest.values() if item.media_type == "application/x-dtbncx+xml"),
            None,
        )
        for item, parse in ((nav, _nav_entries), (ncx, _ncx_entries)):
            if item is None or item.path is None or item.path not in self.archive.members:
                continue
            markup = self.member_text(item.path)
            entries = parse(markup, self.reading.warn) if markup else []
            toc: dict[str, list[tuple[str, str]]] = {}
            for href, title in entries:
                path, fragment = _resolve(posixpath.dirname(item.path), href)
                if path and title:
                    toc.setdefault(path, []).append((fragment, _clip_title(title)))
            if toc:
                return toc
        return {}


def _read_epub(data: bytes, reading: _Reading) -> tuple[str, str, list[Chapter]]:
    book = _Epub(data, reading)
    package, base_dir = book.package()
    paths = book.chapter_paths(package)
    if not paths:
        raise DocumentError(
            f"{reading.name!r} holds no chapters (no package document and no HTML files); "
            "check that it is a complete, DRM-free .epub file."
        )
    toc = book.toc(package, base_dir)
    use_toc = any(path in toc for path in paths)
    segments: list[_Segment] = []
    for path in paths:
        markup = book.member_text(path)
        if markup is None:
            continue
        entries = toc.get(path, []) if use_toc else []
        collector = _HtmlText(
            reading,
            heading_tags=frozenset() if use_toc else frozenset({"h1", "h2"}),
            anchors={fragment: title for fragment, title in entries if fragment},
        )
        collector.feed(markup)
        item_segments = collector.segments()
        item_segments[0].titles[:0] = [title for fragment, title in entries if not fragment]
        segments.extend(item_segments)
    return package.title, *_assemble(segments)


# --- PDF ----------------------------------------------------------------------------------------------------


def _pdf_outline(reader: PdfReader) -> dict[int, list[str]]:
    """Bookmark titles by page index, in outline order; a damaged outline only costs the chapters."""
    by_page: dict[int, list[str]] = {}
    pending: list[Any] = [reader.outline]
    try:
        while pending:  # an explicit stack: outlines can nest as deep as the file says
            items = pending.pop()
            for item in reversed(items):
                if isinstance(item, list):
                    pending.append(item)
                    continue
                page = reader.get_destination_page_number(item)
                title = _clip_title(item.title or "")
                if page is not None and title:
                    by_page.setdefault(page, []).insert(0, title)
    except Exception:  # pypdf raises various errors for broken outlines; the text is still usable
        return {}
    return by_page


def _read_pdf(data: bytes, reading: _Reading) -> tuple[str, str, list[Chapter]]:
    reader = PdfReader(io.BytesIO(data))
    if reader.is_encrypted and not reader.decrypt(""):
        raise DocumentError(
            f"{reading.name!r} is password-protected; remove the password and upload it again."
        )
    pages: list[str] = []
    for number, page in enumerate(reader.pages, start=1):
        try:
            text = page.extract_text() or ""
        except LimitReachedError as exc:
            raise DocumentError(
                f"{reading.name!r}: page {number} holds more data than is safe to decompress "
                f"({_one_line(str(exc))[:120]}); it is probably a decompression bomb, not a document."
            ) from exc
        except MemoryError:
            raise
        except Exception as exc:  # pypdf raises many kinds for a damaged page; the other pages still read
            reading.warn(f"page {number} could not be read ({type(exc).__name__}); it was left out.")
            text = ""
        pages.append(reading.take(text))
    try:
        title = str((reader.metadata.title if reader.metadata else None) or "")
    except Exception:  # damaged metadata only costs the title
        title = ""
    outline = _pdf_outline(reader)
    text, chapters = _assemble([_Segment(outline.get(index, []), page) for index, page in enumerate(pages)])
    return title, text, chapters if outline else _text_chapters(text)


_READERS: dict[str, Callable[[bytes, _Reading], tuple[str, str, list[Chapter]]]] = {
    ".txt": _read_txt,
    ".md": _read_md,
    ".epub": _read_epub,
    ".pdf": _read_pdf,
    ".html": _read_html,
    ".htm": _read_html,
}
