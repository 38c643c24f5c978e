"""Turn uploaded books (txt, md, epub, pdf, html) into one plain text with chapter positions.

The model reads the whole text, so extraction stays faithful (no reflowing, no summarising) and only
normalises whitespace modestly. Chapter starts are kept as character offsets so the app can show a table of
contents and map chapters onto token positions of the long context.
"""

from __future__ import annotations

import bisect
import codecs
import io
import itertools
import posixpath
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import ebooklib
from bs4 import BeautifulSoup, NavigableString, Tag, XMLParsedAsHTMLWarning
from bs4.element import PreformattedString
from ebooklib import epub
from pypdf import PdfReader

SUPPORTED_SUFFIXES = (".txt", ".md", ".epub", ".pdf", ".html", ".htm")


class DocumentError(ValueError):
    """An upload could not be turned into a document; the message is shown to the user as is."""


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


@dataclass
class _Segment:
    """A run of text and the chapters that start where it starts (extractors split the text at chapters)."""

    titles: list[str]
    text: str


def read_document(path: str | Path) -> Document:
    """Read one uploaded file, choosing the extractor by its suffix."""
    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DocumentError(
            f"{name!r} has an unsupported file type {suffix or '(no suffix)'!r}; "
            f"supported types are {', '.join(SUPPORTED_SUFFIXES)} - convert the file to one of them."
        )
    if not path.is_file():
        raise DocumentError(f"{name!r} was not found (looked for {str(path)!r}); upload the file again.")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DocumentError(
            f"{name!r} could not be read ({exc.strerror or exc}); upload the file again."
        ) from exc

    title, text, chapters = _READERS[suffix](data, name)
    if not text.strip():
        hint = (
            "it is probably a scanned PDF without a text layer; "
            "run OCR on it (e.g. with ocrmypdf) and upload the result"
            if suffix == ".pdf"
            else "upload a file that contains the book's text"
        )
        raise DocumentError(f"{name!r} contains no text after extraction; {hint}.")
    return Document(title=title or path.stem, text=text, chapters=chapters, files=[name])


def read_documents(paths: Sequence[str | Path]) -> Document:
    """Read several files as one document so questions can span them; each file becomes a headed chapter."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DocumentError(f"No files were given; upload at least one {', '.join(SUPPORTED_SUFFIXES)} file.")
    docs = [read_document(path) for path in paths]
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
    return Document(title=" + ".join(names), text="\n\n".join(parts), chapters=chapters, files=names)


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


# --- whitespace and assembly -------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Unify line ends, strip trailing spaces and collapse 3+ blank lines to 2; nothing else changes."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip("\n")


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


def _one_line(text: str) -> str:
    """Collapse all whitespace, for titles and for library error texts inside one-line messages."""
    return " ".join(text.split())


# --- plain text and Markdown --------------------------------------------------------------------------------

# C0/C1 control characters other than tab, newline, carriage return and form feed.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_MAX_CONTROL_RATIO = 0.02

_NUMBER_WORD = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|sixteen|"
    "seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|hundred"
)
# A whole line "Chapter <number>", optionally followed by punctuation and a name: "CHAPTER IV.",
# "Chapter 3: The Storm", "Chapter Twenty-One - Home". A name needs the punctuation, so that a wrapped
# sentence line such as "chapter 3 shows that" is not taken for a heading.
_CHAPTER_LINE = re.compile(
    rf"^[ \t]*(?P<heading>chapter[ \t]+(?:\d+|[ivxlcdm]+|(?:{_NUMBER_WORD})(?:[- ](?:{_NUMBER_WORD}))?)"
    r"(?:[ \t]*[:.\-\u2013\u2014](?:[ \t]*\S.*)?)?)$",
    re.IGNORECASE | re.MULTILINE,
)
_MAX_TITLE_CHARS = 120
_MD_HEADING = re.compile(r"^(#{1,2})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_MD_FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")


def _decode_text(data: bytes, name: str) -> str:
    """Decode a plain-text upload (UTF-8, UTF-8/16 with BOM, else cp1252/latin-1) and refuse binary data."""
    binary = DocumentError(
        f"{name!r} looks like binary data, not text; upload a plain-text .txt/.md file "
        "(or convert the document to one of the supported formats first)."
    )
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise binary from exc
    elif b"\x00" in data:
        raise binary
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            try:
                text = data.decode("cp1252")
            except UnicodeDecodeError:
                text = data.decode("latin-1")
    if len(_CONTROL_CHARS.findall(text)) > _MAX_CONTROL_RATIO * len(text):
        raise binary
    return text


def _text_chapters(text: str) -> list[Chapter]:
    """Find "Chapter N" lines, skipping runs of adjacent ones (a table of contents rather than headings)."""
    matches = [m for m in _CHAPTER_LINE.finditer(text) if len(m.group("heading")) <= _MAX_TITLE_CHARS]
    in_contents: set[int] = set()
    for i, (first, second) in enumerate(itertools.pairwise(matches)):
        if text[first.end() : second.start()] == "\n":
            in_contents.update((i, i + 1))
    return [
        Chapter(_one_line(m.group("heading")), m.start("heading"))
        for i, m in enumerate(matches)
        if i not in in_contents
    ]


def _markdown_chapters(text: str) -> list[Chapter]:
    """Find ``#`` and ``##`` headings outside fenced code blocks (where ``#`` is often a comment)."""
    chapters = []
    in_fence = False
    offset = 0
    for line in text.split("\n"):
        if _MD_FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (match := _MD_HEADING.match(line)):
            chapters.append(Chapter(_one_line(match.group(2)), offset))
        offset += len(line) + 1
    return chapters


def _read_txt(data: bytes, name: str) -> tuple[str, str, list[Chapter]]:
    text = _normalise(_decode_text(data, name))
    return "", text, _text_chapters(text)


def _read_md(data: bytes, name: str) -> tuple[str, str, list[Chapter]]:
    text = _normalise(_decode_text(data, name))
    return "", text, _markdown_chapters(text)


# --- HTML and EPUB ------------------------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    "address article aside blockquote body caption dd div dl dt figcaption figure footer form "
    "h1 h2 h3 h4 h5 h6 header hr li main nav ol p pre section table td th tr ul".split()
)
_SKIPPED_TAGS = frozenset({"script", "style", "noscript", "template", "head", "title"})


class _HtmlText:
    """Collect the visible text of an HTML tree, starting a new segment at each chapter.

    Whitespace collapses as in a browser (except inside <pre>), block elements become paragraph breaks and
    <br> a line break. A chapter starts at a heading in ``heading_tags`` or at an element whose id is in
    ``anchors`` (id -> chapter title, used for EPUB table-of-contents links).
    """

    def __init__(self, heading_tags: frozenset[str], anchors: dict[str, str] | None = None) -> None:
        self.heading_tags = heading_tags
        self.anchors = anchors or {}
        self._segments: list[tuple[list[str], list[str]]] = [([], [])]
        self._at_line_start = True

    def segments(self) -> list[_Segment]:
        return [_Segment(titles, "".join(pieces)) for titles, pieces in self._segments]

    def walk(self, node: Tag, in_pre: bool = False) -> None:
        for child in node.children:
            if isinstance(child, Tag):
                self._tag(child, in_pre)
            elif isinstance(child, NavigableString) and not isinstance(child, PreformattedString):
                self._text(str(child), in_pre)

    def _tag(self, tag: Tag, in_pre: bool) -> None:
        if tag.name in _SKIPPED_TAGS:
            return
        if tag.name == "br":
            self._break("\n")
            return
        anchor = tag.get("id") or (tag.get("name") if tag.name == "a" else None)
        title = self.anchors.get(anchor) if isinstance(anchor, str) else None
        if not title and tag.name in self.heading_tags:
            title = _one_line(tag.get_text(" "))
        if title:
            self._segments.append(([title], []))
            self._at_line_start = True
        is_block = tag.name in _BLOCK_TAGS
        if is_block:
            self._break("\n\n")
        self.walk(tag, in_pre or tag.name == "pre")
        if is_block:
            self._break("\n\n")

    def _text(self, text: str, in_pre: bool) -> None:
        pieces = self._segments[-1][1]
        if not in_pre:
            text = re.sub(r"[ \t\n\r\f]+", " ", text)  # HTML whitespace only; a no-break space stays
            if self._at_line_start:
                text = text.lstrip(" ")
            elif text.startswith(" ") and pieces and pieces[-1].endswith(" "):
                text = text[1:]
        if text:
            pieces.append(text)
            self._at_line_start = text.endswith("\n")

    def _break(self, newlines: str) -> None:
        pieces = self._segments[-1][1]
        if pieces and pieces[-1].isspace():  # nested blocks share one break
            pieces[-1] = max(pieces[-1], newlines, key=len)
        elif pieces:
            pieces.append(newlines)
        self._at_line_start = True


def _parse_html(data: bytes) -> BeautifulSoup:
    with warnings.catch_warnings():
        # EPUB chapters are XHTML, which html.parser reads fine; the warning would only be noise.
        warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
        return BeautifulSoup(data, "html.parser")


def _read_html(data: bytes, name: str) -> tuple[str, str, list[Chapter]]:
    soup = _parse_html(data)
    title = _one_line(soup.title.get_text()) if soup.title else ""
    collector = _HtmlText(heading_tags=frozenset({"h1", "h2", "h3"}))
    collector.walk(soup.body or soup)
    return title, *_assemble(collector.segments())


def _flatten_toc(entries: Sequence[Any]) -> list[tuple[str, str]]:
    """(href, title) pairs of an EbookLib TOC in reading order (Links, Sections and (Section, children))."""
    flat: list[tuple[str, str]] = []
    for entry in entries:
        if isinstance(entry, (tuple, list)):
            section, children = entry
            flat.extend(_flatten_toc([section]))
            flat.extend(_flatten_toc(children))
        elif getattr(entry, "href", "") and _one_line(entry.title or ""):
            flat.append((entry.href, _one_line(entry.title)))
    return flat


def _read_epub(data: bytes, name: str) -> tuple[str, str, list[Chapter]]:
    try:
        book = epub.read_epub(io.BytesIO(data))
    except Exception as exc:  # EbookLib raises zip, XML, KeyError, ... errors for damaged files
        raise DocumentError(
            f"{name!r} could not be parsed as EPUB ({type(exc).__name__}: {_one_line(str(exc))}); "
            "check that it is a complete, DRM-free .epub file."
        ) from exc

    documents = [
        item
        for item in (book.get_item_with_id(idref) for idref, _linear in book.spine)
        if item is not None
        and item.get_type() == ebooklib.ITEM_DOCUMENT
        and not isinstance(item, epub.EpubNav)
    ]
    # TOC hrefs are relative to the NCX/nav file and item names to the OPF, so match on the file name only.
    toc: dict[str, list[tuple[str, str]]] = {}
    for href, title in _flatten_toc(book.toc):
        file, _, fragment = unquote(href).partition("#")
        toc.setdefault(posixpath.basename(file), []).append((fragment, title))
    use_toc = any(posixpath.basename(item.get_name()) in toc for item in documents)

    segments: list[_Segment] = []
    for item in documents:
        entries = toc.get(posixpath.basename(item.get_name()), []) if use_toc else []
        collector = _HtmlText(
            heading_tags=frozenset() if use_toc else frozenset({"h1", "h2"}),
            anchors={fragment: title for fragment, title in entries if fragment},
        )
        soup = _parse_html(item.get_content())
        collector.walk(soup.body or soup)
        item_segments = collector.segments()
        item_segments[0].titles[:0] = [title for fragment, title in entries if not fragment]
        segments.extend(item_segments)

    titles = book.get_metadata("DC", "title")
    return (_one_line(titles[0][0] or "") if titles else ""), *_assemble(segments)


# --- PDF ----------------------------------------------------------------------------------------------------


def _pdf_outline(reader: PdfReader) -> dict[int, list[str]]:
    """Bookmark titles by page index, in outline order; a damaged outline only costs the chapters."""
    by_page: dict[int, list[str]] = {}

    def visit(items: list[Any]) -> None:
        for item in items:
            if isinstance(item, list):
                visit(item)
            else:
                page = reader.get_destination_page_number(item)
                title = _one_line(item.title or "")
                if page is not None and title:
                    by_page.setdefault(page, []).append(title)

    try:
        visit(reader.outline)
    except Exception:  # pypdf raises various errors for broken outlines; the text is still usable
        return {}
    return by_page


def _read_pdf(data: bytes, name: str) -> tuple[str, str, list[Chapter]]:
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"{name!r} is password-protected; remove the password and upload it again.")
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises PdfReadError, ValueError, KeyError, ... for damaged files
        raise DocumentError(
            f"{name!r} could not be parsed as PDF ({type(exc).__name__}: {_one_line(str(exc))}); "
            "check that it is a complete, unencrypted .pdf file."
        ) from exc
    outline = _pdf_outline(reader)
    segments = [_Segment(outline.get(index, []), text) for index, text in enumerate(pages)]
    return _one_line(str(title)), *_assemble(segments)


_READERS: dict[str, Callable[[bytes, str], tuple[str, str, list[Chapter]]]] = {
    ".txt": _read_txt,
    ".md": _read_md,
    ".epub": _read_epub,
    ".pdf": _read_pdf,
    ".html": _read_html,
    ".htm": _read_html,
}
