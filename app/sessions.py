"""Sessions: each browser session (or login) has its own books, and the books share one memory budget.

A book is a pre-filled document in a cache of its own size (``Engine.new_cache``); the engine answers from one of
them at a time (``Engine.use``). Books stay resident while their caches fit in ``budget_bytes`` together; to make
room, the least recently used book of any session is saved to its owner's library directory and its cache freed,
and it is loaded back (with progress) when its owner asks about it again.

A session only ever reaches its own books, by its own key: nothing here returns or names another session's book,
so no answer or message can reveal one. Every method that touches the engine runs as one engine job (the caller
is the app's GPU worker, one job at a time).
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from duo_qserve import book_format, library
from duo_qserve.cache import DuoKVCache
from duo_qserve.documents import DocumentError
from duo_qserve.engine import DocumentInfo, DocumentTooLarge, Engine, token_sha256

Progress = Callable[[int, int], None]


class UploadRefused(DocumentError):
    """Files over the per-upload or per-session size limit (nothing of them was read)."""


@dataclass(frozen=True)
class UploadLimits:
    """Bytes one uploaded file, and all the files one session reads, may have: they bound the disk and the
    reading work one anonymous session can cost the machine."""

    per_upload_bytes: int = 256 << 20
    per_session_bytes: int = 2 << 30


class NoBook(LookupError):
    """The session has no such book (never said of another session's book: it is not this session's)."""


@dataclass
class Book:
    info: DocumentInfo
    cache: DuoKVCache | None  # None: evicted, in the owner's library at ``saved``
    saved: str | None = None
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Residency:
    """Counts for the memory readout, over every session (counts only: nothing names another's book)."""

    resident: int  # books whose caches are on the device
    resident_bytes: int
    budget_bytes: int
    in_libraries: int  # evicted books, waiting in their owners' libraries
    evictions: int  # since start
    reloads: int  # evicted books loaded back because their owner asked again


@dataclass
class Session:
    key: str  # the login, or the browser session's hash
    books: dict[str, Book] = field(default_factory=dict)  # by token sha256
    upload_bytes: int = 0  # bytes of the files read in this session (the per-session upload limit)


def owner_key(username: str | None, session_hash: str | None) -> str:
    """Whose books: the login when there is one (books then outlive the browser tab), else the session."""
    if username:
        return f"user:{username}"
    if not session_hash:
        raise ValueError("a request with neither a login nor a session id has no books")
    return f"session:{session_hash}"


class SessionStore:
    """The sessions, their books, and which books are resident within ``budget_bytes`` (LRU eviction)."""

    def __init__(
        self,
        engine: Engine,
        budget_bytes: int,
        library_root: str | Path | None = None,
        uploads: UploadLimits = UploadLimits(),
    ):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.engine, self.budget_bytes, self.uploads = engine, budget_bytes, uploads
        self.root = library.library_dir(library_root) / ".sessions"
        self.max_document_tokens = self._largest_fitting(engine.max_document_tokens)
        self._sessions: dict[str, Session] = {}
        self.evictions = self.reloads = 0
        # guards the session table; the books' caches change only inside an engine job
        self._lock = threading.Lock()

    def _largest_fitting(self, most: int) -> int:
        """The most document tokens (up to ``most``) whose cache fits in the budget on its own."""
        lo, hi = 0, most
        while lo < hi:
            mid = (lo + hi + 1) // 2
            fits = self.engine.cache_spec_for(mid).nbytes <= self.budget_bytes
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        return lo

    # ---- sessions --------------------------------------------------------------------------------------------
    def session(self, key: str) -> Session:
        with self._lock:
            return self._sessions.setdefault(key, Session(key))

    def library_of(self, key: str) -> Path:
        """The owner's private library directory (saved and evicted books); its name reveals nothing."""
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:24]

    def take_uploads(self, key: str, paths: Sequence[str], names: Sequence[str] | None = None) -> None:
        """Count ``paths`` against the session's upload limit, or refuse them all (``UploadRefused``, naming a
        file by its entry in ``names``, the paths' names by default)."""
        sizes = [Path(p).stat().st_size for p in paths]
        limits = self.uploads
        for name, size in zip(names or [Path(p).name for p in paths], sizes, strict=True):
            if size > limits.per_upload_bytes:
                raise UploadRefused(
                    f"{name} has {size:,} bytes; one upload may have at most {limits.per_upload_bytes:,}"
                )
        session = self.session(key)
        with self._lock:
            total = session.upload_bytes + sum(sizes)
            if total > limits.per_session_bytes:
                raise UploadRefused(
                    f"these files would bring this session's uploads to {total:,} bytes, over its limit of "
                    f"{limits.per_session_bytes:,}: start a new session (reload the page) to read more"
                )
            session.upload_bytes = total

    def end(self, key: str) -> None:
        """Forget an anonymous session's books (a login's books stay in its library for the next visit)."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is None:
            return
        with self.engine.job():
            if any(b.cache is self.engine.cache for b in session.books.values()):
                self.engine.use(self.engine.new_cache(0), None)
            session.books.clear()
        if key.startswith("session:"):
            shutil.rmtree(self.library_of(key), ignore_errors=True)

    def drop_all(self) -> None:
        """Forget every book (the engine is being replaced: its caches do not fit the new one)."""
        with self._lock:
            for s in self._sessions.values():
                s.books.clear()

    # ---- books -----------------------------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        return self.residency().resident_bytes

    def _all_books(self) -> list[Book]:
        """Every session's books (for counts and the engine's bookkeeping: never shown, never named)."""
        with self._lock:
            return [b for s in self._sessions.values() for b in s.books.values()]

    def residency(self) -> Residency:
        books = self._all_books()
        resident = [b for b in books if b.cache]
        return Residency(len(resident), sum(b.cache.spec.nbytes for b in resident), self.budget_bytes,
                         len(books) - len(resident), self.evictions, self.reloads)  # fmt: skip

    def book(self, key: str, sha256: str | None) -> Book:
        book = self.session(key).books.get(sha256 or "")
        if book is None:
            raise NoBook("No document is loaded in this session: read one and press Load into model first.")
        return book

    def prefill(
        self, key: str, ids: Sequence[int], title: str, loaded_by: str, on_progress: Progress | None = None
    ) -> DocumentInfo:
        """Pre-fill a document into a new cache of this session (making room first) and make it the engine's."""
        sha = token_sha256(ids)
        with self.engine.job(), self._back_on_failure():
            cache = self._room_for(len(ids))
            self.engine.use(cache, None)
            info = self.engine.ingest(ids, on_progress=on_progress, title=title, loaded_by=loaded_by)
            self.session(key).books[sha] = Book(info, cache)
            return info

    def load_saved(
        self, key: str, book_id: str, loaded_by: str, on_progress: Progress | None = None
    ) -> DocumentInfo:
        """Load a book of this owner's library into a new cache and make it the engine's."""
        path = library._book_dir(book_id, self.library_of(key), ids_only=True)
        with self.engine.job():
            info = self._load(path, loaded_by, on_progress)
            self.session(key).books[info.sha256] = Book(info, self.engine.cache, str(path))
            return info

    def save(self, key: str, sha256: str | None, on_progress: Progress | None = None) -> library.BookInfo:
        """Save this session's book to its owner's library (where eviction finds it too)."""
        book = self.book(key, sha256)
        with self.engine.job():
            self.activate(key, sha256)
            saved = library.save(self.engine, self.library_of(key), on_progress=on_progress)
            book.saved = saved.path
            return saved

    def remove(self, key: str, book_id: str) -> None:
        """Delete a book of the owner's library; a book of the session evicted there is forgotten with it."""
        path = library._book_dir(book_id, self.library_of(key), ids_only=True)
        with self.engine.job():
            shutil.rmtree(path)
            books = self.session(key).books
            for sha, book in list(books.items()):
                if book.saved == str(path):
                    if book.cache is None:
                        del books[sha]
                    else:
                        book.saved = None

    def activate(self, key: str, sha256: str | None, on_progress: Progress | None = None) -> DocumentInfo:
        """Make this session's book the engine's, loading it back from the library if it was evicted."""
        book = self.book(key, sha256)
        with self.engine.job():
            if book.cache is None:
                info = self._load(Path(book.saved), book.info.loaded_by, on_progress)
                book.cache, book.info.prefill_seconds = self.engine.cache, info.prefill_seconds
                self.reloads += 1
            elif book.cache is not self.engine.cache:
                self.engine.use(book.cache, book.info)
            book.last_used = time.monotonic()
            return book.info

    def _load(self, path: Path, loaded_by: str, on_progress: Progress | None) -> DocumentInfo:
        tokens = book_format.read_manifest(path)["tokens"]
        with self._back_on_failure():
            self.engine.use(self._room_for(tokens), None)
            return library.load(self.engine, path, on_progress=on_progress, loaded_by=loaded_by)

    @contextmanager
    def _back_on_failure(self) -> Iterator[None]:
        """Around a pre-fill or a load into a new cache (inside an engine job): if it fails or is cancelled, the
        engine answers again from the book it held before, or from an empty cache if that book was evicted to
        make room. The new cache is dropped either way, so neither its memory nor its figures (the live memory
        readout draws the engine's cache) outlive the work that made it."""
        engine = self.engine
        before = next((b for b in self._all_books() if b.cache is engine.cache), None)
        try:
            yield
        except BaseException:
            if before is not None and before.cache is not None:  # still resident
                engine.use(before.cache, before.info)
            else:
                engine.use(engine.new_cache(0), None)
            raise

    def _room_for(self, tokens: int) -> DuoKVCache:
        """A new empty cache for ``tokens`` document tokens, after evicting least recently used books until it
        fits in the budget beside the books that stay; a document that could never fit is refused first."""
        if tokens > self.max_document_tokens:
            raise DocumentTooLarge(tokens, self.max_document_tokens)
        self.engine.use(self.engine.new_cache(0), None)  # the active book is evictable too
        need = self.engine.cache_spec_for(tokens).nbytes
        while self.resident_bytes() + need > self.budget_bytes:
            self._evict(*self._least_recently_used())
        return self.engine.new_cache(tokens)

    def _least_recently_used(self) -> tuple[str, Book]:
        with self._lock:
            resident = [
                (b.last_used, k, b) for k, s in self._sessions.items() for b in s.books.values() if b.cache
            ]
        _, key, book = min(resident, key=lambda r: r[0])
        return key, book

    def _evict(self, key: str, book: Book) -> None:
        """Save the book to its owner's library (once: a saved book is not written again) and free its cache."""
        if book.saved is None:
            self.engine.use(book.cache, book.info)
            book.saved = library.save(self.engine, self.library_of(key)).path
        book.cache = None
        self.evictions += 1
        self.engine.use(self.engine.new_cache(0), None)
