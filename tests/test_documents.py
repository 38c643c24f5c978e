"""Tests for duo_qserve.documents: every fixture is generated into tmp_path, nothing is downloaded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from ebooklib import epub
from pypdf import PdfReader, PdfWriter

from duo_qserve.documents import (
    SUPPORTED_SUFFIXES,
    Document,
    DocumentError,
    DocumentTooLong,
    ReadLimits,
    chapter_token_offsets,
    document_from_text,
    read_document,
    read_documents,
)


def assert_chapters_point_at(doc: Document, expected: list[tuple[str, str]]) -> None:
    """Chapter titles are as expected and the text at each chapter offset starts with the given content."""
    assert [c.title for c in doc.chapters] == [title for title, _ in expected]
    for chapter, (_, content) in zip(doc.chapters, expected, strict=True):
        assert doc.text[chapter.char_offset :].startswith(content), (
            chapter,
            doc.text[chapter.char_offset :][:40],
        )


# --- fixture builders --------------------------------------------------------------------------------------


def write_pdf(path: Path, pages: list[list[str]], outline: list[tuple[str, int]], title: str | None) -> Path:
    """Write a minimal PDF (Helvetica text lines per page), then add bookmarks and metadata with pypdf."""

    def escape(line: str) -> str:
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects = {
        1: "<< /Type /Catalog /Pages 2 0 R >>",
        2: f"<< /Type /Pages /Kids [{' '.join(f'{i} 0 R' for i in page_ids)}] /Count {len(pages)} >>",
        3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    }
    for page_id, lines in zip(page_ids, pages, strict=True):
        stream = (
            "BT /F1 12 Tf 72 720 Td 16 TL " + " ".join(f"({escape(line)}) Tj T*" for line in lines) + " ET"
        )
        objects[page_id] = (
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {page_id + 1} 0 R >>"
        )
        objects[page_id + 1] = f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream"

    raw = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number in sorted(objects):
        offsets.append(len(raw))
        raw += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode("latin-1")
    xref_at = len(raw)
    raw += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    raw += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    raw += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref_at}\n%%EOF\n".encode()

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(bytes(raw))))
    for bookmark, page in outline:
        writer.add_outline_item(title=bookmark, page_number=page)
    if title:
        writer.add_metadata({"/Title": title})
    with path.open("wb") as file:
        writer.write(file)
    return path


def write_epub(path: Path, with_toc: bool = True) -> Path:
    """Write an EPUB with three chapters, title metadata and (optionally) a TOC via EbookLib."""
    book = epub.EpubBook()
    book.set_identifier("test-book-1")
    book.set_title("The Test Book")
    book.set_language("en")
    chapters = []
    for number, (name, body) in enumerate(
        [
            ("Beginnings", "<p>It was a bright cold day.</p><p>The clocks were striking.</p>"),
            ("The Middle", "<p>Things happened.</p><script>alert('no')</script>"),
            ("The End", "<p>And then it ended.</p>"),
        ],
        start=1,
    ):
        chapter = epub.EpubHtml(title=name, file_name=f"text/ch{number}.xhtml", lang="en")
        chapter.content = f"<html><body><h1>{name}</h1>{body}</body></html>"
        book.add_item(chapter)
        chapters.append(chapter)
    if with_toc:
        book.toc = [
            epub.Link(c.file_name, f"Chapter {i}: {c.title}", f"ch{i}") for i, c in enumerate(chapters, 1)
        ]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["nav", *chapters]
    epub.write_epub(str(path), book)
    return path


# --- formats -----------------------------------------------------------------------------------------------


def test_txt_chapters_and_whitespace(tmp_path: Path) -> None:
    path = tmp_path / "novel.txt"
    path.write_text(
        "A Novel\n\nContents\nCHAPTER I.\nCHAPTER II.\n\n"
        "CHAPTER I.\n\nIt was a dark night.   \n\n\n\n\n\nThe end of the start.\n\n"
        "  Chapter 2: The Storm\nRain fell.\n"
        "This chapter 3 line is prose, not a heading.\n",
        encoding="utf-8",
    )
    doc = read_document(path)
    assert doc.title == "novel"
    assert doc.files == ["novel.txt"]
    assert "It was a dark night.\n\n\nThe end" in doc.text  # trailing spaces gone, 5 blank lines -> 2
    # The adjacent CHAPTER lines of the contents list are not chapters.
    assert_chapters_point_at(
        doc, [("CHAPTER I.", "CHAPTER I.\n\nIt was"), ("Chapter 2: The Storm", "Chapter 2: The Storm\nRain")]
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ("\ufeffCaf\u00e9 na\u00efve".encode(), "Caf\u00e9 na\u00efve"),  # UTF-8 with BOM
        ("Caf\u00e9 \u201cquoted\u201d".encode("cp1252"), "Caf\u00e9 \u201cquoted\u201d"),
        ("Windows \u00e9t\u00e9".encode("utf-16"), "Windows \u00e9t\u00e9"),  # UTF-16 with BOM
    ],
)
def test_txt_encodings(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "enc.txt"
    path.write_bytes(data)
    assert read_document(path).text == expected


def test_markdown_headings(tmp_path: Path) -> None:
    path = tmp_path / "notes.md"
    path.write_text(
        "# Part One\r\n\r\nIntro text.\r\n\r\n## First Steps ##\r\n\r\nSome *text*.\r\n\r\n"
        "```python\r\n# a comment, not a heading\r\n```\r\n\r\n"
        "### Minor heading\r\n\r\n## Second Steps\r\nMore.\r\n",
        encoding="utf-8",
    )
    doc = read_document(path)
    assert doc.title == "notes"
    assert "\r" not in doc.text and "Some *text*." in doc.text
    assert_chapters_point_at(
        doc,
        [
            ("Part One", "# Part One\n\nIntro"),
            ("First Steps", "## First Steps ##\n\nSome"),
            ("Second Steps", "## Second Steps\nMore."),
        ],
    )


def test_html_text_title_and_chapters(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    path.write_text(
        "<!DOCTYPE html><html><head><title>  My   Page </title><style>p {color: red}</style></head><body>"
        "<script>var hidden = 1;</script><p>Preface   text\n   here.</p>"
        "<h1>Part <em>One</em></h1><div><p>First para.</p><p>Second&nbsp;para.<br>Next line.</p></div>"
        "<h2>Section A</h2><ul><li>item 1</li><li>item 2</li></ul><!-- a comment -->"
        "<h3>Sub B</h3><pre>  code\n    indented</pre></body></html>",
        encoding="utf-8",
    )
    doc = read_document(path)
    assert doc.title == "My Page"
    assert "hidden" not in doc.text and "color" not in doc.text and "comment" not in doc.text
    assert doc.text.startswith(
        "Preface text here.\n\nPart One\n\nFirst para.\n\nSecond\u00a0para.\nNext line."
    )
    assert "item 1\n\nitem 2" in doc.text
    assert "  code\n    indented" in doc.text
    assert_chapters_point_at(
        doc,
        [
            ("Part One", "Part One\n\nFirst"),
            ("Section A", "Section A\n\nitem 1"),
            ("Sub B", "Sub B\n\n  code"),
        ],
    )


def test_epub_uses_toc_titles_spine_order_and_metadata(tmp_path: Path) -> None:
    doc = read_document(write_epub(tmp_path / "book.epub"))
    assert doc.title == "The Test Book"
    assert "It was a bright cold day.\n\nThe clocks were striking." in doc.text
    assert "alert" not in doc.text
    assert doc.text.index("Beginnings") < doc.text.index("The Middle") < doc.text.index("The End")
    assert_chapters_point_at(
        doc,
        [
            ("Chapter 1: Beginnings", "Beginnings\n\nIt was"),
            ("Chapter 2: The Middle", "The Middle\n\nThings"),
            ("Chapter 3: The End", "The End\n\nAnd then"),
        ],
    )


def test_epub_without_toc_falls_back_to_headings(tmp_path: Path) -> None:
    doc = read_document(write_epub(tmp_path / "book.epub", with_toc=False))
    assert_chapters_point_at(
        doc, [("Beginnings", "Beginnings\n\nIt was"), ("The Middle", "The Middle"), ("The End", "The End")]
    )


def test_pdf_pages_outline_and_title(tmp_path: Path) -> None:
    path = write_pdf(
        tmp_path / "report.pdf",
        pages=[
            ["Title page (draft)"],
            ["Chapter One", "The first words."],
            [],
            ["Chapter Two", "Last words."],
        ],
        outline=[("One", 1), ("Blank", 2), ("Two", 3)],
        title="A PDF Book",
    )
    doc = read_document(path)
    assert doc.title == "A PDF Book"
    assert doc.text.startswith("Title page (draft)")
    # The bookmark on the empty page starts where the next text does.
    assert_chapters_point_at(
        doc,
        [("One", "Chapter One\nThe first words."), ("Blank", "Chapter Two"), ("Two", "Chapter Two\nLast")],
    )


def test_pdf_without_metadata_uses_file_stem(tmp_path: Path) -> None:
    doc = read_document(write_pdf(tmp_path / "plain.pdf", pages=[["Hello PDF"]], outline=[], title=None))
    assert (doc.title, doc.text, doc.chapters) == ("plain", "Hello PDF", [])


def test_document_from_text() -> None:
    doc = document_from_text("Intro\n\nChapter 1\nText one.\n\nChapter 2\nText two.  \n")
    assert doc.title == "Pasted text" and doc.files == []
    assert_chapters_point_at(
        doc, [("Chapter 1", "Chapter 1\nText one."), ("Chapter 2", "Chapter 2\nText two.")]
    )
    assert [c.title for c in document_from_text("# A\n\nx\n\n## B\n\ny", title="Notes").chapters] == [
        "A",
        "B",
    ]


# --- several files -----------------------------------------------------------------------------------------


def test_read_documents_joins_files_with_headings(tmp_path: Path) -> None:
    first = tmp_path / "a.txt"
    first.write_text("Chapter 1\nAlpha text.\n", encoding="utf-8")
    second = write_pdf(tmp_path / "b.pdf", pages=[["Beta text."]], outline=[("Beta", 0)], title="Ignored")
    doc = read_documents([first, str(second)])
    assert doc.title == "a.txt + b.pdf"
    assert doc.files == ["a.txt", "b.pdf"]
    assert doc.text == "# a.txt\n\nChapter 1\nAlpha text.\n\n# b.pdf\n\nBeta text."
    assert_chapters_point_at(
        doc,
        [
            ("a.txt", "# a.txt\n\n"),
            ("Chapter 1", "Chapter 1\nAlpha"),
            ("b.pdf", "# b.pdf\n\n"),
            ("Beta", "Beta text."),
        ],
    )
    assert read_documents([first]) == read_document(first)


def test_files_are_called_by_the_names_given_and_read_by_their_paths_suffix(tmp_path: Path) -> None:
    """An upload stored under a sanitized name (``Les Misérables 1.txt``) is called by its owner's name for it in
    the title, the files, the headings that join several files and the messages; its path's suffix picks the
    reader."""
    stored = tmp_path / "Les Misérables 1.txt"
    stored.write_text("Chapter 1\nAlpha text.\n", encoding="utf-8")
    doc = read_documents([stored], names=["Les Misérables $1.txt"])
    assert doc.title == "Les Misérables $1" and doc.files == ["Les Misérables $1.txt"]
    both = read_documents([stored, stored], names=["Tome $1.txt", "Tome $2.txt"])
    assert both.text.startswith("# Tome $1.txt\n\n") and "# Tome $2.txt\n\n" in both.text
    empty = tmp_path / "Cosette 1.txt"
    empty.write_text("")
    with pytest.raises(DocumentError, match=r"'Cosette \$1\.md' contains no text"):
        read_document(empty, name="Cosette $1.md")


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("empty.txt", b"", "contains no text"),
        ("blank.md", b"  \n\n\t\n", "contains no text"),
        ("binary.txt", bytes(range(256)) * 4, "binary data"),
        ("controls.md", b"abc" + b"\x01\x02\x03\x04" * 10, "binary data"),
        ("broken.epub", b"PK\x03\x04 this is not really a zip", "could not be parsed as EPUB"),
        ("broken.pdf", b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage", "could not be parsed as PDF"),
        ("notes.docx", b"whatever", "unsupported file type '.docx'"),
    ],
)
def test_bad_files_raise_document_error(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DocumentError, match=message) as error:
        read_document(path)
    assert name in str(error.value) and "\n" not in str(error.value)


def test_unsupported_suffix_lists_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(DocumentError) as error:
        read_document(tmp_path / "scan.png")
    assert all(suffix in str(error.value) for suffix in SUPPORTED_SUFFIXES)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DocumentError, match=r"'gone\.txt' was not found"):
        read_document(tmp_path / "gone.txt")
    with pytest.raises(DocumentError, match="not found"):
        read_documents([tmp_path / "gone.pdf"])


def test_pdf_without_text_layer_says_so(tmp_path: Path) -> None:
    path = write_pdf(tmp_path / "scan.pdf", pages=[[], []], outline=[], title="Scanned")
    with pytest.raises(DocumentError, match="scanned PDF without a text layer"):
        read_document(path)


def test_empty_inputs() -> None:
    with pytest.raises(DocumentError, match="No files"):
        read_documents([])
    with pytest.raises(DocumentError, match="pasted text is empty"):
        document_from_text(" \n\n ")


# --- token offsets -----------------------------------------------------------------------------------------


def test_chapter_token_offsets_match_whole_text_tokenization(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path / "story.md"
    path.write_text(
        "# Opening\n\nIt was a dark and stormy night.\n\n## The Storm\n\nRain fell on the roof.\n\n"
        "## Morning\n\nThe sun rose over the hills.\n",
        encoding="utf-8",
    )
    doc = read_documents([path, write_pdf(tmp_path / "tail.pdf", [["Last page."]], [("Tail", 0)], None)])

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(doc.text.split("\n\n"), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)

    ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    offsets = chapter_token_offsets(doc, tokenizer)
    assert [title for title, _ in offsets] == [c.title for c in doc.chapters]
    assert [index for _, index in offsets] == sorted(index for _, index in offsets)
    for (title, index), chapter in zip(offsets, doc.chapters, strict=True):
        decoded = tokenizer.decode(ids[index:], clean_up_tokenization_spaces=False)
        assert decoded.startswith(doc.text[chapter.char_offset :][:15]), (title, decoded[:30])


# --- limits and warnings -----------------------------------------------------------------------------------


def test_max_chars_stops_a_read_and_counts_all_files_together(tmp_path: Path) -> None:
    first = tmp_path / "a.txt"
    first.write_text("Alpha. " * 100, encoding="utf-8")
    second = write_pdf(tmp_path / "b.pdf", pages=[["Beta. " * 30]] * 3, outline=[], title=None)
    with pytest.raises(DocumentTooLong, match=r"'a\.txt' has more than 500 characters") as error:
        read_document(first, ReadLimits(max_chars=500))
    assert error.value.max_chars == 500
    both = len(read_documents([first, second]).text)
    with pytest.raises(DocumentTooLong, match=r"files together have more than .* \(reached in 'b\.pdf'\)"):
        read_documents([first, second], ReadLimits(max_chars=both - 100))
    assert read_documents([first, second], ReadLimits(max_chars=both)).text.endswith("Beta.")


def test_upload_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 2048)
    with pytest.raises(DocumentError, match=r"'big\.txt' is 0\.0 MiB; the most one upload may be is 0 MiB"):
        read_document(path, ReadLimits(max_file_bytes=1024))


def test_warnings_name_their_file_and_survive_joining(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("Clean text.", encoding="utf-8")
    damaged = tmp_path / "damaged.txt"
    damaged.write_bytes("Caf\u00e9 one. ".encode() * 30 + b"\xff" + " Caf\u00e9 two.".encode())
    doc = read_documents([good, damaged])
    assert "Caf\u00e9 one. \ufffd Caf\u00e9 two." in doc.text
    assert doc.warnings == [
        "damaged.txt: 1 byte sequence(s) that are not valid UTF-8 were replaced with \ufffd."
    ]
