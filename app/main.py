"""The Gradio app: upload a book, watch it pre-fill, ask many questions, see answers stream and memory live.

One process holds one engine; each browser session (or login) has its own books and conversation, kept by
``app.sessions.SessionStore`` (books resident within one memory budget, the least recently used one in its owner's
library until asked about again). Every engine call runs in a worker thread under ``engine.lock`` (see ``Job``) and
every event that runs the model shares one Gradio concurrency slot, so other users wait in Gradio's queue and see
their position. Changing the model or its settings drops every session's books, so only the operator may
(``--admin-token``). Uploads are size-limited and deleted once read; exports are deleted after an hour.

Run: ``python -m app.main [--host 127.0.0.1] [--port 7860] [--model default] [--cpu] ...`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import functools
import gc
import hmac
import queue
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import torch

from app import ranks
from app import ui_render as render
from app.sessions import NoBook, SessionStore, UploadLimits, owner_key
from duo_qserve import environment, library
from duo_qserve.conversation import Conversation
from duo_qserve.distributed import ContextGroup, quiet_interrupt
from duo_qserve.documents import (
    SUPPORTED_SUFFIXES,
    Document,
    DocumentError,
    DocumentTooLong,
    ReadLimits,
    chapter_token_offsets,
    document_from_text,
    read_documents,
)
from duo_qserve.engine import (
    ANSWER_RESERVE,
    Cancelled,
    DocumentInfo,
    DocumentTooLarge,
    Engine,
    EngineSettings,
    GenerationStats,
    token_sha256,
)
from duo_qserve.eta import PrefillClock
from duo_qserve.evidence import describe
from duo_qserve.loading import ModelLoadError
from duo_qserve.models import known_names, named_model
from duo_qserve.options import add_engine_args, parse_pattern, settings_from_args
from duo_qserve.patterns import PatternError, load_pattern
from duo_qserve.sampling import Sampling

GPU = "gpu"  # concurrency_id shared by every event that runs the model: one at a time, the rest queue
_DONE = object()
TEMP_FILE_SECONDS = 3600  # exports (and gradio's copies of files) are deleted this long after they were made


CHARS_PER_TOKEN_BOUND = 16


@dataclasses.dataclass
class Pending:
    """A document read and tokenized in one session, not yet pre-filled."""

    document: Document
    ids: list[int]
    engine_generation: int  # ids are re-made if the engine (and so maybe the tokenizer) was replaced
    chapters: list[tuple[str, int]] = dataclasses.field(
        default_factory=list
    )  # (title, token offset in the text)


class Job:
    """One engine call in a worker thread that holds the engine's lock.

    Gradio may abandon a cancelled generator without closing it; the work still ends (``cancel`` makes the engine
    stop at its next chunk or token, and every update re-asserts it) and the lock is always released, so the GPU
    never stays busy for nobody.
    """

    def __init__(
        self,
        owner: str,
        work: Callable[[Job], Any],
        lock: threading.Lock,
        on_cancel: Callable[[], None] | None = None,
        kind: str = "document",
    ):
        # kind: "answer" (what Stop stops) or "document" (a pre-fill or a library job: what Cancel stops)
        self.owner, self._on_cancel, self.kind = owner, on_cancel, kind
        # (title, tokens done, tokens in all) while the job pre-fills a document, for a question asked meanwhile
        self.reading: tuple[str, int, int] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self._updates: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, args=(work, lock), daemon=True).start()

    def _run(self, work: Callable[[Job], Any], lock: threading.Lock) -> None:
        try:
            with lock:
                self.result = work(self)
        except Exception as e:  # handed to the event's thread, which turns it into a message
            self.error = e
        finally:
            self.done.set()
            self._updates.put(_DONE)

    def put(self, update: Any) -> None:
        if self.cancelled:  # a cancel that came before the engine cleared its flag must not be lost
            self.cancel()
        self._updates.put(update)

    def cancel(self) -> None:
        self.cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    def stream(self, interval: float = 0.25) -> Iterator[list]:
        """Batches of updates, one at least every ``interval`` seconds, until the work is done."""
        while True:
            batch = []
            try:
                batch.append(self._updates.get(timeout=interval))
                while not self._updates.empty():
                    batch.append(self._updates.get_nowait())
            except queue.Empty:
                pass
            yield [u for u in batch if u is not _DONE]
            if _DONE in batch:
                return


def _key(request: gr.Request) -> str:
    """Whose books a request reaches (see ``app.sessions.owner_key``)."""
    return owner_key(request.username, request.session_hash)


def _who(request: gr.Request) -> str:
    """The name shown next to a loaded document: the login when auth is on, else a short session id."""
    return request.username or f"session {(request.session_hash or '?')[:6]}"


def _uploads(files: list[dict | str]) -> tuple[list[str], list[str]]:
    """The stored paths of uploads and the names to show for them. An upload comes as the page sends it,
    Gradio's ``FileData`` as a dict (Read's event skips Gradio's preprocessing, which would keep only the path:
    see ``_wire_document``), or as a path (a direct call; its name is then the path's).

    Gradio stores an upload under a name stripped of the characters it deems unsafe in paths and shells (``$ ! {
    } ` : ? * " < > |``, control characters), so ``Les Misérables $1.txt`` is stored as ``Les Misérables
    1.txt``; the name the browser sent is ``FileData.orig_name``, and that is the one shown, in the title and
    in messages. It is the client's word, so it is only ever a name, never a path (what is read is the stored
    path, which Gradio checked is in its upload folder, and its suffix picks the reader): only its last path part
    is taken, without unprintable characters, at most 200 characters, and the stored name where nothing is left.
    """
    paths, names = [], []
    for f in files:
        path = f if isinstance(f, str) else f["path"]
        sent = "" if isinstance(f, str) else re.split(r"[\\/]", f.get("orig_name") or "")[-1]
        shown = "".join(c for c in sent if c.isprintable()).strip()[:200]
        paths.append(path)
        names.append(shown or Path(path).name)
    return paths, names


def _delete_uploads(paths: list[str]) -> None:
    """Remove uploaded files (and the folder gradio made for each, once empty)."""
    for p in map(Path, paths):
        p.unlink(missing_ok=True)
        try:
            p.parent.rmdir()
        except OSError:  # not empty, or already gone
            pass


def _answer_stats_line(stats: GenerationStats, doc: DocumentInfo, max_new_tokens: int) -> str:
    """The line under an answer: its speed, length and ending, the question's and the earlier turns' tokens in
    context (and turns that no longer fit), where the document's tokens came from, the evidence pass's time."""
    ending = render.ENDINGS[stats.ended_by]
    if stats.ended_by == "cancel":
        ending = f"stopped after {stats.answer_tokens} of at most {max_new_tokens} tokens; ready"
    turns = f"turn {stats.history_turns + 1} of this conversation ({stats.history_turns} earlier in context"
    turns += f", {stats.history_tokens:,} tokens)"
    if stats.dropped_turns:
        turns += (
            f" · **the oldest {stats.dropped_turns} turn{'s' if stats.dropped_turns > 1 else ''} no longer "
            "fit after the document and left the model's context** (they stay in the export)"
        )
    line = (
        f"{stats.ttft_s:.2f} s to first token · {stats.decode_ms_per_token:.0f} ms/token · "
        f"{stats.answer_tokens} answer tokens, {ending} · question {stats.question_tokens} tokens · {turns}; "
        f"the {doc.tokens:,} document tokens came from the cache ('{doc.title}', loaded by {doc.loaded_by})"
    )
    if stats.evidence:
        line += f" · sources found in {stats.evidence_s:.2f} s"
    return line


def _check_paths(settings: EngineSettings) -> None:
    """Refuse a missing model or a bad pattern before the running engine is touched."""
    model = settings.model
    named = named_model(model) is not None
    if not named and not model.startswith("synthetic:") and not Path(model).expanduser().exists():
        raise ModelLoadError(
            f"model {model!r} was not found: give a named model ({', '.join(known_names())}), a Hugging Face "
            "checkpoint directory or a .gguf file"
        )
    if settings.pattern not in (None, "auto"):
        load_pattern(settings.pattern)


class Server:
    """The process-wide engine and the handlers of the UI's events."""

    def __init__(
        self,
        settings: EngineSettings,
        admin_token: str | None = None,
        uploads: UploadLimits | None = None,
        evidence: bool = True,
        make_engine: Callable[[EngineSettings], Engine] = Engine.from_settings,
    ):
        self.settings, self.admin_token, self.uploads = settings, admin_token, uploads or UploadLimits()
        # how an engine is built: ``app.ranks.LeaderEngine.build`` under torchrun, so the other ranks build theirs
        self.make_engine = make_engine
        self.evidence = evidence  # show the passages each answer came from (duo_qserve.evidence)
        self.chapters: dict[str, list[tuple[str, int]]] = {}  # by document sha256, for the passages' chapters
        # by owner key: the uploads each session read (and so deleted), to tell them from uploads not yet written
        self.read_uploads: dict[str, set[str]] = {}
        self.exports = Path(tempfile.mkdtemp(prefix="duo-qserve-exports-"))
        self.engine: Engine = self.make_engine(settings)
        self.store = self._new_store()
        self.generation = 0
        self.job: Job | None = None
        # sessions whose question waits in the queue behind their own pre-fill (``ask_waits``), and those of them
        # that pressed Stop meanwhile: their question is not asked when its turn comes
        self.waiting: set[str] = set()
        self.withdrawn: set[str] = set()
        self.warm_status = ""
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile the kernels and capture a decode graph in the background (``Engine.warm_up``), so the first
        answer is as fast as the later ones; events that run the model wait behind the engine's lock meanwhile,
        and ``warm_status`` (shown live) says how far it is."""
        engine = self.engine
        self.prefill_prior = None  # the time-left clock's cost curve for this engine (duo_qserve.eta)
        self.warm_status = "Warming up the model: starting…"

        def progress(stage: str) -> None:
            self.warm_status = f"Warming up the model: {stage}… (questions wait for it)"

        def work(job: Job) -> None:
            try:
                t0 = time.perf_counter()
                engine.warm_up(progress)
                if engine.device.type == "cpu":  # a GPU pre-fills a book in seconds: its clock needs no prior
                    progress("timing a pre-fill chunk")
                    probe = engine.chunk_seconds(PrefillClock.PROBE)
                    self.prefill_prior = PrefillClock.prior_from_probe(
                        PrefillClock.PROBE, probe, engine.chunk_size
                    )
                seconds = time.perf_counter() - t0
            except Exception as e:  # the app still works: the first answer then compiles what it needs
                self.warm_status = f"Warm-up failed ({e}); the first answer will compile the kernels itself."
                return
            done = (
                "kernels compiled and the decode graph captured" if engine.device.type == "cuda" else "ready"
            )
            self.warm_status = f"Warm-up done in {seconds:.1f} s: {done}."

        Job("warm-up", work, engine.lock)

    def _new_store(self) -> SessionStore:
        """The sessions' books for the current engine: its planned cache becomes their shared budget."""
        budget = self.engine.capacity.nbytes
        self.engine.use(self.engine.new_cache(0), None)  # free the planned cache: the books take its place
        return SessionStore(self.engine, budget, uploads=self.uploads)

    # ---- helpers ---------------------------------------------------------------------------------------------
    def _start(self, owner: str, work: Callable[[Job], Any], engine: Engine, kind: str = "document") -> Job:
        self.job = Job(owner, work, engine.lock, engine.cancel, kind)
        return self.job

    def _ids(self, pending: Pending) -> list[int]:
        if pending.engine_generation != self.generation:
            pending.ids = self.engine.document_ids(pending.document.text)
            pending.engine_generation = self.generation
        return pending.ids

    @staticmethod
    def _fraction_progress(job: Job, verb: str) -> Iterator[str]:
        """Status lines of a library job that reports the fraction done, until it ends."""
        for batch in job.stream():
            if batch:
                yield f"{verb}… {batch[-1]:.0%}"

    def _loaded_note(self, mine: str | None, request: gr.Request) -> str:
        """What this session still has loaded (never another session's book)."""
        try:
            return f"The model still holds **{self.store.book(_key(request), mine).info.title}**."
        except NoBook:
            return "No document is loaded."

    def _summary(self, pending: Pending, request: gr.Request) -> tuple[str, Any, Any]:
        """Summary text, the apply-ratio button and the load button for a document read in this session."""
        engine, doc = self.engine, pending.document
        n = len(self._ids(pending))
        fits = self.store.max_document_tokens
        ratio = engine.smallest_sparsity_for(n) if n > fits else None
        # only the operator can reload (with the admin token, in Settings, which only a server with one shows)
        can_reload = self.admin_token is not None
        text = render.document_summary(doc.title, doc.files, len(doc.text), n, fits, ratio, can_reload)
        sha = token_sha256(pending.ids)
        saved = library.find_by_hash(sha, self.store.library_of(_key(request)), engine=engine)
        if saved:
            text += (
                f"\n\nA saved copy is in the **Library** ('{saved[0].title}', {saved[0].settings}): "
                "load it there in seconds instead of pre-filling."
            )
        ratio_button = gr.update(
            visible=ratio is not None and can_reload,
            value=f"Reload with {ratio:.0%} streaming heads" if ratio is not None else "Reload",
        )
        return text, ratio_button, gr.update(interactive=n <= fits)

    # ---- documents -------------------------------------------------------------------------------------------
    def _max_chars(self) -> int:
        """Characters past which no setting could hold a document: reading stops there instead of tokenizing it.
        The largest room any streaming-head ratio offers, at a generous 16 characters per token (English prose
        takes about 4)."""
        tokens = max(self.engine.max_document_tokens, self.engine.document_tokens_at(1.0))
        return int(CHARS_PER_TOKEN_BOUND * tokens)

    def read(
        self, files: list[dict | str] | None, text: str, mine: str | None, request: gr.Request
    ) -> tuple[Any, ...]:
        """Read uploads (``files``, see ``_uploads``) or pasted text into one document and say whether it fits,
        before any GPU work. The uploaded files are deleted once read: nobody can fetch them afterwards, and
        reading them again (the box still lists them) is refused with that reason, withdrawing the earlier reading
        from Load. A refused read deletes nothing: the files it did not read stay in the box, to be read once the
        offending one is removed."""
        if self.engine is None:  # only while a GPU engine is replaced (the old one had to go first)
            raise gr.Error(
                "The model is being reloaded with new settings; read the document again in a moment."
            )
        try:
            if files:
                paths, names = _uploads(files)
                self._check_uploads_present(paths, names, request)
                self.store.take_uploads(_key(request), paths, names)
                doc = read_documents(paths, ReadLimits(max_chars=self._max_chars()), names)
                self.read_uploads.setdefault(_key(request), set()).update(paths)
                _delete_uploads(paths)
            elif text and text.strip():
                doc = document_from_text(text)
            else:
                raise DocumentError(
                    f"Nothing to read: upload {', '.join(SUPPORTED_SUFFIXES)} files or paste text first."
                )
        except DocumentTooLong:
            message = (
                f"**Not read:** the text is longer than {self._max_chars():,} characters, more than this model "
                f"can hold at any streaming-head ratio.\n\n{self._loaded_note(mine, request)}"
            )
            return message, [], None, gr.update(visible=False), gr.update(interactive=False)
        except DocumentError as e:
            message = f"**Not read:** {e}\n\n{self._loaded_note(mine, request)}"
            return message, [], None, gr.update(visible=False), gr.update(interactive=False)
        offsets = chapter_token_offsets(doc, self.engine.tokenizer)
        pending = Pending(doc, self.engine.document_ids(doc.text), self.generation, offsets)
        chapters = [[title, offset] for title, offset in offsets]
        summary, ratio_button, load_button = self._summary(pending, request)
        if doc.warnings:  # what the reader could not read faithfully: said, never dropped silently
            shown = "\n".join(f"- {w}" for w in doc.warnings[:10])
            more = f"\n- … and {len(doc.warnings) - 10} more" if len(doc.warnings) > 10 else ""
            summary += f"\n\n**Read with warnings:**\n{shown}{more}"
        return summary, chapters, pending, ratio_button, load_button

    def _check_uploads_present(self, paths: list[str], names: list[str], request: gr.Request) -> None:
        """Refuse (``DocumentError``, naming only those files, by ``names``) uploads that are not on disk: deleted
        because this session read them already, or, never read here, not yet written by an upload still under way
        (or removed by Gradio's hourly clean-up of its files)."""
        missing = [(p, name) for p, name in zip(paths, names, strict=True) if not Path(p).is_file()]
        if not missing:
            return
        read_here = self.read_uploads.get(_key(request), set())
        read = [name for p, name in missing if p in read_here]
        uploading = [name for p, name in missing if p not in read_here]
        reasons = []
        if read:
            reasons.append(
                f"{', '.join(read)}: already read, and deleted after reading; remove "
                f"{'it' if len(read) == 1 else 'them'} from the upload box and upload again"
            )
        if uploading:
            reasons.append(
                f"{', '.join(uploading)}: not on the server: still uploading (try again in a moment) or, left "
                "unread for an hour, removed (upload it again)"
            )
        raise DocumentError("; ".join(reasons))

    def prefill(
        self, pending: Pending | None, mine: str | None, request: gr.Request
    ) -> Iterator[tuple[Any, ...]]:
        """Pre-fill the read document into a book of this session, streaming a progress bar (``mine``: the
        session's current book, named if the pre-fill is cancelled)."""
        if pending is None:
            yield (
                gr.skip(),
                "**Not loaded:** read a document first: upload files or paste text, then press Read.",
                mine,
            )
            return
        engine, doc = self.engine, pending.document
        ids = self._ids(pending)

        def work(job: Job) -> Any:
            job.put((0, time.perf_counter()))  # the engine is ours: the clock starts
            return self.store.prefill(
                _key(request),
                ids,
                doc.title,
                _who(request),
                on_progress=lambda done, total: job.put((done, time.perf_counter())),
            )

        started, done, clock = time.perf_counter(), 0, None
        job = self._start(request.session_hash, work, engine)
        job.reading = (doc.title, 0, len(ids))
        yield render.progress_html(0, len(ids), 0.0, "waiting for the model…"), "Pre-filling…", gr.skip()
        try:
            for batch in job.stream():
                for done, at in batch:
                    if clock is None:
                        started, clock = at, PrefillClock(done, at, prior=self.prefill_prior)
                    clock.done(done, at)
                if batch:
                    job.reading = (doc.title, done, len(ids))
                    left = clock.seconds_left(len(ids))
                    yield (
                        render.progress_html(done, len(ids), time.perf_counter() - started, left=left),
                        gr.skip(),
                        gr.skip(),
                    )
        finally:
            if not job.done.is_set():  # the page was closed
                job.cancel()
        if isinstance(job.error, Cancelled):
            status = (
                f"**Cancelled** after {done:,} of {len(ids):,} tokens. {self._loaded_note(mine, request)}"
            )
            yield render.progress_html(done, len(ids), 1.0, "cancelled"), status, mine  # its book stays
            return
        if isinstance(job.error, DocumentTooLarge):
            yield render.progress_html(done, len(ids), 1.0, "stopped"), f"**Stopped:** {job.error}", mine
            return
        if job.error is not None:
            status = f"**Pre-fill failed:** {job.error}. {self._loaded_note(mine, request)}"
            yield render.progress_html(done, len(ids), 1.0, "failed"), status, mine
            return
        info = job.result
        if clock is not None and engine is self.engine:  # this pre-fill's cost curve: the next one's prior
            self.prefill_prior = clock.fit()
        self.chapters[info.sha256] = pending.chapters
        rate = info.prefilled / info.prefill_seconds if info.prefill_seconds else 0.0
        bar = render.progress_html(
            len(ids),
            len(ids),
            info.prefill_seconds,
            f"done in {render.fmt_seconds(info.prefill_seconds)} ({rate:,.0f} tokens/s)",
        )
        status = (
            f"Loaded **{info.title}**: {info.tokens:,} tokens in {render.fmt_seconds(info.prefill_seconds)} "
            f"({rate:,.0f} tokens/s). Ask away: each question reuses this cache."
        )
        yield bar, status, info.sha256

    def cancel(self, request: gr.Request) -> None:
        """Cancel: stop this session's running pre-fill or library job (never an answer, never another user's)."""
        job = self._running(request, "document")
        if job is not None:
            job.cancel()

    def stop(self, request: gr.Request) -> Any:
        """Stop: end this session's running answer (which then says so and keeps what it wrote), or withdraw its
        question still waiting behind its own pre-fill, which runs on. Returns the line under the chat: the
        withdrawal's, else ``skip`` (the answer's own event says how it ended)."""
        job = self._running(request, "answer")
        if job is not None:
            job.cancel()
        elif request.session_hash in self.waiting:
            self.waiting.discard(request.session_hash)
            self.withdrawn.add(request.session_hash)
            return "**Stopped:** your question will not be asked; the book is still being read."
        return gr.skip()

    def _running(self, request: gr.Request, kind: str) -> Job | None:
        job = self.job
        if job is None or job.owner != request.session_hash or job.kind != kind or job.done.is_set():
            return None
        return job

    # ---- questions -------------------------------------------------------------------------------------------
    def ask_waits(self, question: str, request: gr.Request) -> Any:
        """The line under the chat, said the moment Ask is pressed while this session's pre-fill runs (or ``skip``
        otherwise). The question then waits in the GPU queue behind the pre-fill, where the page itself shows no
        more than the queue's position on the chat, and ``ask`` answers it as soon as the pre-fill ends, about
        the book the session holds by then: the book just read, or, if the pre-fill was cancelled, the one before
        (``ask`` names it as it starts)."""
        job = self.job
        if not (question or "").strip() or job is None or job.owner != request.session_hash:
            return gr.skip()
        reading = job.reading
        if reading is None or job.done.is_set():
            return gr.skip()
        title, done, total = reading
        self.waiting.add(request.session_hash)
        return (
            f"**Waiting:** **{title}** is still being read ({done:,} of {total:,} tokens, "
            f"{done / max(total, 1):.0%}); your question is answered as soon as it is loaded."
        )

    def ask(
        self,
        question: str,
        history: list[dict],
        conversation: Conversation,
        mine: str | None,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        repetition_penalty: float,
        no_repeat_ngram: float,
        repeat_stop: float,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Stream the answer about this session's document; its cache is restored (or loaded back from the
        library, with progress, if it was evicted), so only the conversation's earlier turns and the question are
        pre-filled. Stop ends the answer and keeps it (the event itself runs to its end). What goes wrong is said
        once, in the line under the chat, and the question stays in its box unless it was answered."""
        engine, question = self.engine, (question or "").strip()
        self.waiting.discard(request.session_hash)
        if request.session_hash in self.withdrawn:
            self.withdrawn.discard(request.session_hash)
            yield (
                gr.skip(),
                gr.skip(),
                "**Not asked:** you pressed Stop while it waited; it is still in the box.",
            )
            return
        if not question:
            yield gr.skip(), gr.skip(), "**Not asked:** type a question first."
            return
        try:
            doc = self.store.book(_key(request), mine).info
        except NoBook as e:
            yield gr.skip(), gr.skip(), f"**Not asked:** {e}"
            return
        sampling = dict(
            temperature=float(temperature),
            top_p=float(top_p),
            repetition_penalty=float(repetition_penalty),
            no_repeat_ngram=int(no_repeat_ngram),
            repeat_stop=int(repeat_stop),
        )
        answer = [""]

        def work(job: Job) -> Any:
            self.store.activate(_key(request), mine, on_progress=lambda d, t: job.put(d / t))
            pieces = engine.ask(
                question,
                max_new_tokens=int(max_new_tokens),
                conversation=conversation,
                meta={"provenance": render.provenance(engine)},
                evidence=self.evidence,
                **sampling,
            )
            try:
                for piece in pieces:
                    answer[0] += piece
                    job.put(piece)
            finally:
                pieces.close()
            return engine.last

        history = [*history, {"role": "user", "content": question}]
        job = self._start(request.session_hash, work, engine, kind="answer")
        yield [*history, {"role": "assistant", "content": "…"}], "", f"Answering about **{doc.title}**…"
        try:
            for batch in job.stream():
                reloading = [u for u in batch if isinstance(u, float)]  # a fraction of the book's reload
                if reloading:
                    note = f"Loading your book back from the library… {reloading[-1]:.0%}"
                    yield gr.skip(), gr.skip(), note
                elif batch:
                    yield [*history, {"role": "assistant", "content": answer[0]}], gr.skip(), gr.skip()
        finally:
            if not job.done.is_set():  # the page was closed
                job.cancel()
        if job.error is not None:
            # a turn that never reached the model (e.g. its book could not be loaded back) is not in the
            # conversation (the engine adds a turn only once it has started answering): its question goes back
            if answer[0]:
                shown = [*history, {"role": "assistant", "content": answer[0]}]
                yield shown, gr.skip(), f"**Answer cut short:** {job.error}"
            else:
                yield history[:-1], question, f"**Not answered:** {job.error}"
            return
        stats = job.result
        shown = answer[0] or "_(no answer)_"
        if stats.evidence:
            shown += "\n\n" + self._evidence_markdown(stats, doc, question, conversation)
        line = _answer_stats_line(stats, doc, int(max_new_tokens))
        yield [*history, {"role": "assistant", "content": shown}], gr.skip(), line

    def _evidence_markdown(
        self, stats: GenerationStats, doc: DocumentInfo, question: str, conversation: Conversation
    ) -> str:
        """The passages an answer came from (``stats.evidence``, not empty), as shown under it; they are also
        kept in the question's turn of ``conversation`` for the export."""
        engine = self.engine
        passages = describe(
            stats.evidence, engine.document_text_start, engine.tokenizer, doc.ids,
            self.chapters.get(doc.sha256, []),
        )  # fmt: skip
        if conversation.turns and conversation.turns[-1].question == question:
            conversation.turns[-1].meta["passages"] = passages  # for the export
        return render.passages_markdown(passages)

    def export(self, fmt: str, conversation: Conversation) -> Any:
        """Write every turn of the conversation with its provenance to a file for download; with none, say so in
        one notice (a raised error would also mark the file box)."""
        turns = conversation.records()
        if not turns:
            gr.Warning("Nothing to export yet: ask a question first.", title="Not exported")
            return gr.skip()
        for old in self.exports.iterdir():  # the temp files of earlier exports, once downloaded
            if time.time() - old.stat().st_mtime > TEMP_FILE_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(dir=self.exports))
        if fmt == "JSON":
            path = folder / "conversation.json"
            path.write_text(render.export_json(turns))
        else:
            path = folder / "conversation.md"
            path.write_text(render.export_markdown(turns))
        return str(path)

    # ---- library ---------------------------------------------------------------------------------------------
    def books(self, request: gr.Request) -> Any:
        """This owner's saved books for the dropdown, newest first (unfinished pre-fill checkpoints are not
        offered)."""
        books = [b for b in library.list_books(self.store.library_of(_key(request))) if not b.partial]
        choices = [
            (f"{b.title} · {b.tokens:,} tokens · {b.model}, {b.settings} · {b.created[:16]}", b.id)
            for b in books
        ]
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    def save_book(self, mine: str | None, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """Save this session's document's cache so it can be loaded later without a pre-fill."""
        if refused := self._library_refusal("Saving a book"):
            yield f"**Not saved:** {refused}", gr.skip()
            return
        engine, key = self.engine, _key(request)
        try:
            self.store.book(key, mine)
        except NoBook as e:
            yield f"**Not saved:** {e}", gr.skip()
            return
        job = self._start(
            request.session_hash,
            lambda job: self.store.save(key, mine, on_progress=lambda d, t: job.put(d / t)),
            engine,
        )
        for line in self._fraction_progress(job, "Saving"):
            yield line, gr.skip()
        if job.error is not None:
            yield f"**Not saved:** {job.error}", gr.skip()
            return
        book = job.result
        saved = f"Saved **{book.title}** ({render.fmt_bytes(book.bytes)}) as `{book.id}`."
        yield f"{saved} {self.library_lifetime(request)}", self.books(request)

    @staticmethod
    def library_lifetime(request: gr.Request) -> str:
        """How long this owner's saved books last, said beside the library and with each save: without a login
        a reload starts a new session, and the ended session's library is deleted (``SessionStore.end``), since
        nothing could tell its owner from anyone else who opens the page."""
        if request.username:
            return "Your saved books stay in your library for your next sign-in."
        return (
            "**Without sign-in (the app's --auth), saved books last only while this tab is open:** reloading or "
            "closing the page deletes them."
        )

    def load_book(
        self, book_id: str | None, mine: str | None, request: gr.Request
    ) -> Iterator[tuple[Any, ...]]:
        """Load one of this owner's saved books (checked against this engine's model and settings first); streams
        (library status, document status, pre-fill progress bar, ``mine``). A loaded book becomes the session's
        document, so the document area says so too and its bar (of an earlier pre-fill) is cleared: left as they
        were, they would describe the previous document."""
        skip = (gr.skip(),) * 3
        if refused := self._library_refusal("Loading a book"):
            yield f"**Not loaded:** {refused}", *skip
            return
        if not book_id:
            yield "**Not loaded:** pick a saved book first.", *skip
            return
        engine = self.engine

        def work(job: Job) -> Any:
            return self.store.load_saved(
                _key(request), book_id, _who(request), on_progress=lambda d, t: job.put(d / t)
            )

        job = self._start(request.session_hash, work, engine)
        for line in self._fraction_progress(job, "Loading"):
            yield line, *skip
        if job.error is not None:
            yield f"**Not loaded:** {job.error}\n\n{self._loaded_note(mine, request)}", *skip
            return
        info = job.result
        yield (
            f"Loaded **{info.title}** from the library in {info.prefill_seconds:.1f} s: {info.tokens:,} tokens, "
            "no pre-fill. Ask away.",
            f"Loaded **{info.title}** from the library: {info.tokens:,} tokens, no pre-fill. Ask away: each "
            "question reuses this cache.",
            "",
            info.sha256,
        )

    def _library_refusal(self, action: str) -> str:
        """The library's reason for refusing ``action`` where this engine cannot use it (context parallelism), or
        "": checked before anything else is asked of the user, and said in the library's status line."""
        try:
            library.refuse_context_parallel(self.engine, action)
        except library.LibraryError as e:
            return str(e)
        return ""

    def remove_book(self, book_id: str | None, request: gr.Request) -> tuple[Any, ...]:
        if not book_id:
            return "**Not removed:** pick a saved book first.", gr.skip()
        self.store.remove(_key(request), book_id)
        return f"Removed `{book_id}`.", self.books(request)

    def end_session(self, request: gr.Request) -> None:
        """The tab was closed: an anonymous session's books and library go (a login's stay for its next visit), and
        so does any question of it that was waiting or withdrawn."""
        self.read_uploads.pop(_key(request), None)
        self.waiting.discard(request.session_hash)
        self.withdrawn.discard(request.session_hash)
        if not request.username:
            self.store.end(_key(request))

    # ---- live readouts ---------------------------------------------------------------------------------------
    def banner(self, mine: str | None, request: gr.Request) -> str:
        """This session's document (never another's)."""
        try:
            book = self.store.book(_key(request), mine)
        except NoBook:
            return "No document loaded yet."
        doc, where = book.info, "" if book.cache is not None else " (in the library until you ask)"
        return f"Loaded: **{doc.title}**, {doc.tokens:,} tokens{where} · sha256 `{doc.sha256[:12]}`"

    def tick(self, mine: str | None, request: gr.Request) -> tuple[Any, ...]:
        engine = self.engine
        if engine is None:  # being replaced
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        memory = render.memory_html(engine, books=self.store.residency())
        return memory, self.banner(mine, request), render.head_map_html(engine), self.warm_status

    # ---- settings --------------------------------------------------------------------------------------------
    def _replace_engine(self, settings: EngineSettings) -> None:
        """Build the engine for ``settings`` (the caller holds the old engine's lock); on any error keep, or
        re-create, the old one and re-raise."""
        _check_paths(settings)
        if self.engine.device.type == "cuda" and settings.max_tokens is None:
            # the new cache is planned from free GPU memory, so the old engine must go first
            self.store.drop_all()
            self.engine = None  # type: ignore[assignment]
            gc.collect()
            torch.cuda.empty_cache()
            try:
                self.engine = self.make_engine(settings)
            except Exception:
                self.engine = self.make_engine(self.settings)
                self.store = self._new_store()
                raise
        else:
            self.engine = self.make_engine(settings)
        self.store.drop_all()  # the books' caches were made for the old engine
        self.store = self._new_store()
        self.settings = settings
        self.generation += 1
        self._warm_up()

    def operator_refusal(self, token: str | None) -> str:
        """Why ``token`` may not change the engine, or "": engine-wide changes drop every session's books, so only
        the operator (``--admin-token``) may make them. Said in the area's status line, like every user error."""
        if self.admin_token is None:
            return (
                "changing the model or its settings is for the operator of this server, and this server was "
                "started without an admin token (--admin-token), so nobody can change them here."
            )
        if not hmac.compare_digest((token or "").encode(), self.admin_token.encode()):
            return (
                "changing the model or its settings is for the operator of this server: give the admin token "
                "(the app's --admin-token) in Settings."
            )
        return ""

    def apply_settings(
        self,
        model: str,
        pattern: str,
        ratio: float,
        kv_bits: str,
        w8a8: bool,
        token: str,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Settings' Apply, for the operator only: re-create the engine with the settings given, streaming the
        settings' status line and the capacity headline."""
        if refused := self.operator_refusal(token):
            yield f"**Not applied:** {refused}", gr.skip()
            return
        for message in self.apply(self.settings_from_ui(model, pattern, ratio, kv_bits, w8a8), request):
            yield message, render.capacity_headline(self.engine)

    def apply_ratio(
        self, pending: Pending | None, token: str, request: gr.Request
    ) -> Iterator[tuple[Any, ...]]:
        """The document area's Reload, for the operator only: re-create the engine at the smallest streaming
        ratio the read document fits at, then re-summarize it; streams (document status, headline, summary,
        ratio button, load button, Settings' ratio slider)."""
        skip = (gr.skip(),) * 4
        try:
            refused = self.operator_refusal(token)
            target = None if refused else self.ratio_settings(pending)
        except ValueError as e:
            refused = str(e)
        if refused:
            yield f"**Not reloaded:** {refused}", gr.skip(), *skip
            return
        for message in self.apply(target, request):
            yield message, render.capacity_headline(self.engine), *skip
        yield (
            gr.skip(),
            render.capacity_headline(self.engine),
            *self._summary(pending, request),
            self.settings.sparsity,
        )

    def apply(self, settings: EngineSettings, request: gr.Request) -> Iterator[str]:
        """Re-create the engine, showing a message while it loads; errors leave the old engine in place (the
        caller has checked ``operator_refusal``)."""
        what = f"{settings.model}, pattern {settings.pattern}, {settings.sparsity:.0%} streaming heads, KV{settings.kv_bits}"
        # no cancel hook: the job must not keep the old engine alive while it is replaced
        job = self.job = Job(
            request.session_hash, lambda job: self._replace_engine(settings), self.engine.lock
        )
        started = time.perf_counter()
        for _ in job.stream(interval=0.5):
            if not job.done.is_set():
                yield f"Loading {what}… {time.perf_counter() - started:.0f} s"
        if job.error is not None:
            yield f"**Error:** {job.error}. The previous engine is kept."
            return
        yield f"Loaded {what} in {time.perf_counter() - started:.0f} s. Any loaded document was dropped: load it again."

    def settings_from_ui(
        self, model: str, pattern: str, sparsity: float, kv_bits: str, w8a8: bool
    ) -> EngineSettings:
        return dataclasses.replace(
            self.settings,
            model=(model or "default").strip(),
            pattern=parse_pattern(pattern),
            sparsity=float(sparsity),
            kv_bits=int(kv_bits),
            w8a8=bool(w8a8),
        )

    def ratio_settings(self, pending: Pending | None) -> EngineSettings:
        """Settings with the smallest streaming ratio at which the read document fits in the same cache bytes
        (``ValueError``, said to the user, where there is no document or no such ratio)."""
        if pending is None:
            raise ValueError("read a document first.")
        engine = self.engine
        ratio = engine.smallest_sparsity_for(len(self._ids(pending)))
        if ratio is None:
            raise ValueError("no streaming-head ratio makes this document fit.")
        max_tokens = self.settings.max_tokens
        # a fixed token count would not grow with the ratio: keep the cache's bytes instead
        if engine.device.type == "cpu" or max_tokens is not None:
            max_tokens = engine.document_tokens_at(ratio) + ANSWER_RESERVE
        return dataclasses.replace(self.settings, sparsity=ratio, max_tokens=max_tokens)


# ---- the page ------------------------------------------------------------------------------------------------
# ``build_app`` lays the page out area by area (the ``_*_area`` functions, in the order the areas appear: the
# left column top to bottom, then the right one), then wires the events (the ``_wire_*`` functions). An area
# function must be called inside the page's ``gr.Blocks``, where its components go; it returns them for wiring.

ON_GPU = dict(concurrency_limit=1, concurrency_id=GPU)  # the event arguments of every model-running event


@dataclasses.dataclass
class DocumentArea:
    """Accordion "1 · Document": read an upload or pasted text, then pre-fill it."""

    files: gr.File
    pasted: gr.Textbox
    read_button: gr.Button
    summary: gr.Markdown
    ratio_button: gr.Button  # "Reload" at the streaming ratio the read document needs (operator only)
    load_button: gr.Button
    cancel_button: gr.Button
    progress: gr.HTML
    doc_status: gr.Markdown
    chapters: gr.Dataframe


@dataclasses.dataclass
class AskArea:
    """Accordion "2 · Ask": the conversation, its sampling settings and its export."""

    chatbot: gr.Chatbot
    question: gr.Textbox
    ask_button: gr.Button
    stop_button: gr.Button
    clear_button: gr.Button
    answer_stats: gr.Markdown
    # in ``Server.ask``'s order: temperature, top-p, max new tokens, repetition penalty, no-repeat n-gram, repeat stop
    sampling: list[gr.Slider]
    export_format: gr.Radio
    export_button: gr.Button
    export_file: gr.File


@dataclasses.dataclass
class LibraryArea:
    """Accordion "Library (saved books)": this owner's saved books."""

    book: gr.Dropdown
    load_book_button: gr.Button
    remove_book_button: gr.Button
    refresh_books_button: gr.Button
    save_book_button: gr.Button
    lifetime: gr.Markdown  # how long saved books last: only while the tab is open, without a login
    library_status: gr.Markdown


@dataclasses.dataclass
class SettingsArea:
    """Accordion "Settings (operator only)": the engine's model and settings, changed with the admin token."""

    model: gr.Textbox
    pattern: gr.Textbox
    sparsity: gr.Slider
    kv_bits: gr.Radio
    w8a8: gr.Checkbox
    admin: gr.Textbox
    apply_button: gr.Button
    settings_status: gr.Markdown


def _document_area() -> DocumentArea:
    """Lay out the document accordion: upload or paste, Read and its summary, Reload (hidden until a read
    document needs another ratio), Load into model (enabled by a read) and Cancel, the pre-fill's progress bar
    and status, and the chapters table."""
    with gr.Accordion("1 · Document", open=True):
        files = gr.File(
            label="Upload a book (several files become one document)",
            file_count="multiple",
            file_types=list(SUPPORTED_SUFFIXES),
            height=120,
        )
        pasted = gr.Textbox(label="…or paste text", lines=3, max_lines=8)
        read_button = gr.Button("Read", variant="secondary")
        summary = gr.Markdown(elem_id="summary")
        ratio_button = gr.Button("Reload", visible=False, variant="secondary")
        with gr.Row():
            load_button = gr.Button("Load into model", variant="primary", interactive=False)
            cancel_button = gr.Button("Cancel", variant="stop")
        progress = gr.HTML(elem_id="progress")
        doc_status = gr.Markdown(elem_id="doc-status")
        with gr.Accordion("Chapters", open=False):
            chapters = gr.Dataframe(
                headers=["Chapter", "Token offset"], datatype=["str", "number"], interactive=False
            )
    return DocumentArea(
        files, pasted, read_button, summary, ratio_button, load_button, cancel_button, progress, doc_status,
        chapters,
    )  # fmt: skip


def _ask_area() -> AskArea:
    """Lay out the ask accordion: the conversation, the question box, Ask / Stop / New conversation, the last
    answer's stats line, the sampling sliders (greedy by default) and the export (Markdown or JSON)."""
    with gr.Accordion("2 · Ask", open=True):
        chatbot = gr.Chatbot(label="Conversation", height=360, elem_id="chat")
        question = gr.Textbox(label="Question", placeholder="What is the book about?", lines=1)
        with gr.Row():
            ask_button = gr.Button("Ask", variant="primary")
            stop_button = gr.Button("Stop", variant="stop")
            clear_button = gr.Button("New conversation")
        answer_stats = gr.Markdown(elem_id="answer-stats")
        with gr.Accordion("Sampling", open=False):
            temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            max_new = gr.Slider(16, 2048, value=256, step=16, label="Max new tokens")
            repetition_penalty = gr.Slider(
                1.0, 2.0, value=Sampling.repetition_penalty, step=0.05,
                label="Repetition penalty on the answer's own tokens (1 = off)",
            )  # fmt: skip
            no_repeat_ngram = gr.Slider(
                0, 8, value=Sampling.no_repeat_ngram, step=1,
                label="No repeated n-grams of this length in the answer (0 = off)",
            )  # fmt: skip
            repeat_stop = gr.Slider(
                0, 128, value=Sampling.repeat_stop, step=4,
                label="Stop once the answer repeats this many tokens (0 = off)",
            )  # fmt: skip
        with gr.Accordion("Export the conversation (with model, settings and document hash)", open=False):
            with gr.Row():
                export_format = gr.Radio(["Markdown", "JSON"], value="Markdown", label="Format")
                export_button = gr.Button("Export")
            export_file = gr.File(label="Download", interactive=False, height=70)
    sampling = [temperature, top_p, max_new, repetition_penalty, no_repeat_ngram, repeat_stop]
    return AskArea(
        chatbot, question, ask_button, stop_button, clear_button, answer_stats, sampling, export_format,
        export_button, export_file,
    )  # fmt: skip


def _memory_area(engine: Engine) -> tuple[gr.HTML, gr.HTML]:
    """Lay out the live readouts of the right column: the memory bar and the head map, drawn for ``engine``
    now (``_wire_live_readouts`` refreshes them); returns (memory, head map)."""
    gr.Markdown("### Memory (live)")
    memory = gr.HTML(render.memory_html(engine), elem_id="memory")
    gr.Markdown("### Head map")
    head_map = gr.HTML(render.head_map_html(engine), elem_id="head-map")
    return memory, head_map


def _library_area() -> LibraryArea:
    """Lay out the library accordion (closed): the saved-books dropdown (filled on page load), Load book /
    Remove / Refresh, Save the loaded document, how long saved books last (filled on page load), and a status
    line."""
    with gr.Accordion("Library (saved books)", open=False):
        book = gr.Dropdown(label="Saved books", choices=[], allow_custom_value=False)
        with gr.Row():
            load_book_button = gr.Button("Load book")
            remove_book_button = gr.Button("Remove")
            refresh_books_button = gr.Button("Refresh")
        save_book_button = gr.Button("Save the loaded document")
        lifetime = gr.Markdown(elem_id="library-lifetime")
        library_status = gr.Markdown()
    return LibraryArea(
        book, load_book_button, remove_book_button, refresh_books_button, save_book_button, lifetime,
        library_status,
    )  # fmt: skip


def _settings_area(server: Server) -> SettingsArea:
    """Lay out the settings accordion, shown only when the server has an admin token: the running engine's
    model, pattern, streaming ratio, KV bits and W8A8 as starting values, the admin token box and Apply."""
    engine = server.engine
    with gr.Accordion("Settings (operator only)", open=False, visible=server.admin_token is not None):
        model = gr.Textbox(
            value=engine.settings.model,
            label="Model (a name such as qwen2.5-coder-0.5b, a checkpoint dir or .gguf)",
        )
        pattern = gr.Textbox(
            value=str(engine.settings.pattern),
            label="Attention pattern (a path, 'auto' or 'none')",
        )
        sparsity = gr.Slider(
            0.0, 1.0, value=engine.settings.sparsity, step=0.05, label="Streaming-head ratio"
        )
        kv_bits = gr.Radio(["4", "8", "16"], value=str(engine.cache_config.kv_bits), label="KV bits")
        w8a8 = gr.Checkbox(value=engine.w8a8, label="W8A8 weights and activations")
        admin = gr.Textbox(label="Admin token (the app's --admin-token)", type="password")
        apply_button = gr.Button("Apply (reloads the model)")
        settings_status = gr.Markdown()
    return SettingsArea(model, pattern, sparsity, kv_bits, w8a8, admin, apply_button, settings_status)


def _wire_document(server: Server, doc: DocumentArea, pending: gr.State, mine: gr.State) -> None:
    """Read ("/read": files or pasted text into ``pending``, the summary, chapters and buttons), Load into model
    ("/prefill", on the GPU: ``pending`` pre-filled, ``mine`` set to its hash) and Cancel ("/cancel", outside
    the queue: it only tells the engine to stop this session's job)."""
    doc.read_button.click(
        server.read,
        [doc.files, doc.pasted, mine],
        [doc.summary, doc.chapters, pending, doc.ratio_button, doc.load_button],
        api_name="read",
        preprocess=False,  # the uploads' FileData, with the names the browser sent (see ``_uploads``)
    )
    doc.load_button.click(
        server.prefill, [pending, mine], [doc.progress, doc.doc_status, mine], api_name="prefill", **ON_GPU
    )
    doc.cancel_button.click(server.cancel, None, None, api_name="cancel", concurrency_limit=None)


def _wire_ask(server: Server, ask: AskArea, conversation: gr.State, mine: gr.State) -> None:
    """Ask ("/ask", on the GPU; Enter in the question box does the same, unlisted in the API) streams the
    answer into the chat and clears the question; pressed during this session's pre-fill, it also says at once
    that the question waits for it; Stop ("/stop") ends this session's answer or withdraws its question waiting
    behind its pre-fill (Cancel, in the document area, stops the pre-fill); New conversation
    ("/clear", also the chat's trash icon) empties the chat and ``conversation``; Export ("/export") writes it
    to a file."""
    ask_inputs = [ask.question, ask.chatbot, conversation, mine, *ask.sampling]
    ask_outputs = [ask.chatbot, ask.question, ask.answer_stats]
    # a question waiting for the GPU shows the queue on the chat only, so the question box stays readable and
    # the line under the chat can say why it waits (``Server.ask_waits``, outside the queue). That listener comes
    # first: registered after Ask's, it reached the server only once Ask's event had ended (the page holds back
    # an event whose input, here the question, is an output of one still pending).
    gr.on(
        [ask.ask_button.click, ask.question.submit],
        server.ask_waits,
        ask.question,
        ask.answer_stats,
        show_progress="hidden",
        concurrency_limit=None,
        api_visibility="private",
    )
    on_gpu = dict(ON_GPU, show_progress_on=ask.chatbot)
    ask.ask_button.click(server.ask, ask_inputs, ask_outputs, api_name="ask", **on_gpu)
    ask.question.submit(server.ask, ask_inputs, ask_outputs, api_visibility="private", **on_gpu)
    # Stop and Cancel only tell the engine: the event then ends by itself and says what happened (cancelling
    # the event would leave its last status standing and show an error badge for the user's own action).
    ask.stop_button.click(
        server.stop, None, ask.answer_stats, api_name="stop", concurrency_limit=None, show_progress="hidden"
    )
    # the chat's own trash icon is New conversation too: emptying only the screen would leave the model (and
    # the export) with turns the user no longer sees
    gr.on(
        [ask.clear_button.click, ask.chatbot.clear],
        lambda: ([], Conversation(), ""),
        None,
        [ask.chatbot, conversation, ask.answer_stats],
        api_name="clear",
    )
    ask.export_button.click(
        server.export, [ask.export_format, conversation], ask.export_file, api_name="export"
    )


def _wire_library(
    server: Server, demo: gr.Blocks, lib: LibraryArea, doc: DocumentArea, mine: gr.State
) -> None:
    """The dropdown is filled on page load and by Refresh ("/books"), the books' lifetime note on page load;
    Save ("/save_book") and Load book ("/load_book", which sets ``mine`` and the document area's status and
    progress bar) run on the GPU; Remove ("/remove_book") deletes a saved book."""
    lib.refresh_books_button.click(server.books, None, lib.book, api_name="books")
    demo.load(server.books, None, lib.book, api_visibility="undocumented")
    demo.load(server.library_lifetime, None, lib.lifetime, api_visibility="undocumented")
    lib.save_book_button.click(
        server.save_book, mine, [lib.library_status, lib.book], api_name="save_book", **ON_GPU
    )
    lib.load_book_button.click(
        server.load_book,
        [lib.book, mine],
        [lib.library_status, doc.doc_status, doc.progress, mine],
        api_name="load_book",
        **ON_GPU,
    )
    lib.remove_book_button.click(
        server.remove_book, lib.book, [lib.library_status, lib.book], api_name="remove_book"
    )


def _wire_settings(
    server: Server, settings: SettingsArea, doc: DocumentArea, pending: gr.State, headline: gr.Markdown
) -> None:
    """Apply ("/apply") and the document area's Reload ("/apply_ratio") re-create the engine on the GPU, each
    only with the admin token (``Server.operator_refusal``, said in the area's status line), and redraw the
    capacity headline; Reload also re-summarizes the read document and sets the ratio slider to the ratio it
    applied."""
    engine_fields = [settings.model, settings.pattern, settings.sparsity, settings.kv_bits, settings.w8a8]
    settings.apply_button.click(
        server.apply_settings,
        [*engine_fields, settings.admin],
        [settings.settings_status, headline],
        api_name="apply",
        **ON_GPU,
    )
    doc.ratio_button.click(
        server.apply_ratio,
        [pending, settings.admin],
        [doc.doc_status, headline, doc.summary, doc.ratio_button, doc.load_button, settings.sparsity],
        api_name="apply_ratio",
        **ON_GPU,
    )


def _wire_live_readouts(
    server: Server,
    mine: gr.State,
    memory: gr.HTML,
    banner: gr.Markdown,
    head_map: gr.HTML,
    warm_up: gr.Markdown,
) -> None:
    """Add the page's 1 s timer: it redraws the memory bar, this session's banner, the head map and the warm-up
    line (outside the queue, never shown as progress)."""
    timer = gr.Timer(1.0)
    timer.tick(
        server.tick, mine, [memory, banner, head_map, warm_up], show_progress="hidden", concurrency_limit=None,
        api_visibility="undocumented",
    )  # fmt: skip


def build_app(server: Server) -> gr.Blocks:
    """The UI, wired to ``server``; every model-running event is in the one GPU concurrency group."""
    engine = server.engine
    cleanup = (TEMP_FILE_SECONDS // 4, TEMP_FILE_SECONDS)  # gradio deletes its copies of files on this timer
    with gr.Blocks(title="duo-qserve: ask a whole book", delete_cache=cleanup) as demo:
        pending = gr.State(None)
        mine = gr.State(None)  # sha256 of the document this session loaded
        conversation = gr.State(Conversation())
        gr.Markdown("# duo-qserve: ask questions about a whole book")
        headline = gr.Markdown(render.capacity_headline(engine), elem_id="capacity")
        warm_up = gr.Markdown(server.warm_status, elem_id="warm-up")
        banner = gr.Markdown("No document loaded yet.", elem_id="banner")
        with gr.Row():
            with gr.Column(scale=3):
                doc = _document_area()
                ask = _ask_area()
            with gr.Column(scale=2):
                memory, head_map = _memory_area(engine)
                lib = _library_area()
                settings = _settings_area(server)

        _wire_document(server, doc, pending, mine)
        _wire_ask(server, ask, conversation, mine)
        _wire_library(server, demo, lib, doc, mine)
        demo.unload(server.end_session)
        _wire_settings(server, settings, doc, pending, headline)
        _wire_live_readouts(server, mine, memory, banner, head_map, warm_up)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m app.main", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--auth", metavar="USER:PASS", help="require this login; answers then name the user")
    add_engine_args(p, defaults=EngineSettings(model="demo"))
    p.add_argument(
        "--admin-token",
        default=environment.admin_token(),
        help="who knows it may change the model and its settings in the app (default: $DUO_QSERVE_ADMIN_TOKEN; "
        "without one nobody can)",
    )
    limits = UploadLimits()
    p.add_argument(
        "--max-upload-mb",
        type=int,
        default=limits.per_upload_bytes >> 20,
        help="MB (MiB) one uploaded file may have (default: %(default)s)",
    )
    p.add_argument(
        "--max-session-upload-mb",
        type=int,
        default=limits.per_session_bytes >> 20,
        help="MB (MiB) one session may upload in all (default: %(default)s)",
    )
    p.add_argument(
        "--no-evidence",
        dest="evidence",
        action="store_false",
        help="do not show under each answer the passages the retrieval heads attended to (saves one short pass)",
    )
    a = p.parse_args(argv)
    if a.auth and ":" not in a.auth:
        p.error("--auth wants USER:PASS, e.g. --auth alice:s3cret")
    return a


def main(argv: list[str] | None = None) -> None:
    """Serve the app. Under ``torchrun --nproc-per-node N`` (context parallelism) rank 0 serves it and the other
    ranks follow its engine calls (``app.ranks``); the library and the passages under answers are then off. A
    Ctrl-C ends every rank with one line (``distributed.quiet_interrupt``)."""
    faulthandler.register(
        signal.SIGUSR1
    )  # `kill -USR1 <pid>` prints every thread's stack: what a hang waits on
    with quiet_interrupt():
        _serve(parse_args(argv))


def _serve(a: argparse.Namespace) -> None:
    """``main``'s work: this rank's part of serving the app."""
    settings = settings_from_args(a)
    group = ContextGroup.from_env(settings.device) if ContextGroup.launched() else None
    if group is not None and not group.is_leader:
        ranks.follow(group)
        group.close()
        return
    make_engine = (
        Engine.from_settings if group is None else functools.partial(ranks.LeaderEngine.build, group)
    )
    if group is not None:
        print(f"context parallelism over {group.world_size} ranks: no library, no passages under answers")
    print(f"loading {settings.model}…", flush=True)
    try:
        uploads = UploadLimits(a.max_upload_mb << 20, a.max_session_upload_mb << 20)
        server = Server(settings, a.admin_token, uploads, evidence=a.evidence and group is None,
                        make_engine=make_engine)  # fmt: skip
        demo = build_app(server)
        auth = tuple(a.auth.split(":", 1)) if a.auth else None
        demo.queue().launch(
            server_name=a.host,
            server_port=a.port,
            share=a.share,
            auth=auth,
            show_error=True,
            max_file_size=server.uploads.per_upload_bytes,
        )
    except (ModelLoadError, PatternError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        if group is not None:
            ranks.stop(group)
            group.close()


if __name__ == "__main__":
    main()
