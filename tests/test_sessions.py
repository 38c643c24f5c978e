"""Per-session books on one engine: isolation, a shared memory budget, LRU eviction to the library and reload."""

from __future__ import annotations

import re

import pytest
from conftest import haystack_text

from app.sessions import NoBook, SessionStore
from app.ui_render import memory_html
from duo_qserve.engine import Cancelled, DocumentTooLarge, Engine

QUESTION = "According to the document, what is the secret number?"


def planted(secret: str, start_file: int) -> str:
    text = haystack_text(1000, start_file)
    return text[:500] + f" The secret number is {secret}. " + text[500:]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(device="cpu", max_tokens=2048, chunk_size=256)


def test_books_share_a_budget_the_least_recently_used_is_evicted_and_reloads(engine, tmp_path):
    ids_a = engine.document_ids(planted("48213", 0))
    ids_b = engine.document_ids(planted("90517", 1))
    one_book = engine.cache_spec_for(max(len(ids_a), len(ids_b))).nbytes
    store = SessionStore(engine, budget_bytes=int(one_book * 1.5), library_root=tmp_path)
    a = store.prefill("session:a", ids_a, "alpha", "session a")
    assert "48213" in engine.answer(QUESTION, max_new_tokens=24)
    b = store.prefill("session:b", ids_b, "beta", "session b")  # no room for both: alpha goes to the library
    assert store.session("session:a").books[a.sha256].cache is None
    assert store.resident_bytes() <= store.budget_bytes
    assert "90517" in engine.answer(QUESTION, max_new_tokens=24)
    progress = []
    info = store.activate("session:a", a.sha256, on_progress=lambda d, t: progress.append(d / t))
    assert info.title == "alpha" and progress and progress[-1] == 1.0
    assert "48213" in engine.answer(QUESTION, max_new_tokens=24)
    assert store.session("session:b").books[b.sha256].cache is None  # now beta waits in its owner's library
    assert list(store.library_of("session:a").iterdir()) and list(store.library_of("session:b").iterdir())
    books = store.residency()
    assert (books.resident, books.in_libraries, books.evictions, books.reloads) == (1, 1, 2, 1)
    assert books.resident_bytes == store.resident_bytes() <= books.budget_bytes
    readout = memory_html(engine, books=books)
    assert (
        "Books on the device: 1 " in readout
        and "1 waiting in a library · 2 evicted, 1 loaded back" in readout
    )
    assert "alpha" not in readout and "beta" not in readout


def test_a_session_never_reaches_another_sessions_book(engine, tmp_path):
    store = SessionStore(engine, budget_bytes=1 << 30, library_root=tmp_path)
    a = store.prefill("session:a", engine.document_ids(planted("48213", 0)), "alpha", "session a")
    for sha in (a.sha256, None, ""):
        with pytest.raises(NoBook) as e:
            store.activate("session:c", sha)
        assert "alpha" not in str(e.value) and "session a" not in str(e.value)
    store.end("session:a")
    with pytest.raises(NoBook):
        store.activate("session:a", a.sha256)
    assert not store.library_of("session:a").exists()


def test_a_book_larger_than_the_budget_is_refused_and_the_others_stay(engine, tmp_path):
    ids = engine.document_ids(planted("48213", 0))
    store = SessionStore(engine, budget_bytes=engine.cache_spec_for(len(ids)).nbytes, library_root=tmp_path)
    a = store.prefill("session:a", ids, "alpha", "session a")
    larger = engine.document_ids(haystack_text(3000))
    # it fits the engine's capacity, not the budget
    assert store.max_document_tokens < len(larger) <= engine.max_document_tokens
    with pytest.raises(DocumentTooLarge, match=f"{store.max_document_tokens:,} document tokens"):
        store.prefill("session:b", larger, "larger", "session b")
    assert store.session("session:a").books[a.sha256].cache is not None  # nothing was evicted for it
    store.activate("session:a", a.sha256)
    assert "48213" in engine.answer(QUESTION, max_new_tokens=24)


def _cache_figures(engine) -> list[str]:
    """What the memory readout says of the engine's cache: its KV bytes and the context it holds."""
    readout = memory_html(engine)
    return re.findall(r"(?:Retrieval KV|KV scales|Streaming KV) [\d.]+ \w+|Context held: [^·]+", readout)


def test_a_cancelled_prefill_gives_the_engine_back_the_book_it_held_or_an_empty_cache(engine, tmp_path):
    """The live memory readout draws the engine's cache: after a cancelled pre-fill it shows the book the engine
    answered from before (or, where that book was evicted to make room, no book), never the cancelled pre-fill's
    cache, which is dropped."""
    ids_a = engine.document_ids(planted("48213", 0))
    # several chunks: each pre-fill of it is cancelled after the first
    longer = engine.document_ids(haystack_text(3000, start_file=1))
    assert len(longer) > 2 * engine.chunk_size

    def cancel(done: int, total: int) -> None:
        engine.cancel()

    store = SessionStore(engine, budget_bytes=1 << 30, library_root=tmp_path / "roomy")
    a = store.prefill("session:a", ids_a, "alpha", "session a")
    before, cache = _cache_figures(engine), engine.cache
    with pytest.raises(Cancelled):
        store.prefill("session:a", longer, "longer", "session a", on_progress=cancel)
    assert engine.cache is cache and engine.document is a and _cache_figures(engine) == before

    one_book = engine.cache_spec_for(len(longer)).nbytes
    store = SessionStore(engine, budget_bytes=int(one_book * 1.2), library_root=tmp_path / "tight")
    a = store.prefill("session:a", ids_a, "alpha", "session a")
    with pytest.raises(Cancelled):  # alpha is evicted to make room first
        store.prefill("session:b", longer, "longer", "session b", on_progress=cancel)
    assert store.session("session:a").books[a.sha256].cache is None
    assert engine.document is None and engine.cache.max_tokens == engine.cache_spec_for(0).max_tokens
    store.activate("session:a", a.sha256)
    assert "48213" in engine.answer(QUESTION, max_new_tokens=24)
