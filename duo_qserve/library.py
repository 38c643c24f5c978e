"""Book library: save a pre-filled document's cache to disk, load it back in seconds, resume a stopped pre-fill.

A pre-fill of a million tokens takes minutes; its compressed cache reads back from disk in seconds (Llama-3-8B,
1M tokens, KV4, 50 % streaming heads: an 18.3 GB book saved in 15 s and loaded cold in 12 s on the H100 machine,
near its disk's 1.2 GB/s write and 2.1 GB/s read; benchmarks/results/library-*.json). A book is a directory
``<library>/<book_id>/`` of three files: ``manifest.json`` (what the cache was made with, the document, the data
file's layout and one sha256 per block of it), ``cache.bin`` (the checkpointed cache state only, written in blocks
of ``BLOCK_BYTES``) and ``tokens.bin`` (the document's token ids). ``duo_qserve.book_format`` says what each holds
and checks a book's files and manifest; this module checks a book against the running engine and moves the cache's
bytes.

Data moves through one bounded host buffer (``SLOTS`` blocks, pinned on CUDA): no second copy of the cache in GPU
or host memory. Several blocks are hashed and read or written at once, one thread each, because one sha256
stream (1.4 GB/s measured) is slower than the disk and far slower than a read from the page cache.

Loading checks every manifest field against the running engine before touching the cache, and every block's
checksum before copying it in. When the engine already holds a document, the whole file is verified in a first
streaming pass and copied in a second, so a damaged book leaves that document answering (the second read usually
comes from the page cache). With no document to protect, one pass verifies each block just before copying it, and
a failure leaves the engine empty.

A save writes a staged copy beside the book and swaps it in under the library's lock (``_write_book``); a save
killed at any step leaves the old or the new complete book, which ``recover`` (run by ``scan``/``list_books`` and by
every save) puts in place. ``scan`` lists the books and, apart, the directories that are not loadable books.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from duo_qserve import environment
from duo_qserve.book_format import (
    DATA,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TOKENS,
    BookCorrupt,
    BookMismatch,
    LibraryError,
    read_manifest,
    read_tokens,
    write_tokens,
)
from duo_qserve.cache import CacheConfig, DuoKVCache
from duo_qserve.engine import DocumentInfo, Engine, EngineSettings, token_sha256
from duo_qserve.patterns import UNIFORM_PATTERN_NAME

BLOCK_BYTES = 64 << 20  # one checksum per block; a write or read is one block
# Blocks hashed and moved at once, one thread each; the host buffer is SLOTS * BLOCK_BYTES.
SLOTS = min(8, max(2, os.cpu_count() or 2))
LOCK = ".lock"  # in the library directory: held by a save, and by start-up recovery
# Stages of a save beside its book: .<book>.writing-<tag> (being written), .<book>.new-<tag> (complete, not yet
# in place), .<book>.old-<tag> (the replaced copy, being deleted); see _write_book and recover.
_STAGED = re.compile(r"\.(?P<book>.+)\.(?P<stage>writing|new|old)-(?P<tag>\d+-[0-9a-f]{8})")
# Per weight tensor, this many evenly spaced windows of bytes go into the weight checksum: cheap even for 8B.
WEIGHT_SAMPLES, WEIGHT_SAMPLE_BYTES = 16, 4096

log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class BookInfo:
    id: str
    title: str
    tokens: int
    bytes: int  # of cache.bin
    created: str  # ISO 8601, UTC
    model: str
    settings: str  # one line, e.g. "float16, W8A8, KV4, 50% streaming heads, sink 64 / recent 256"
    token_sha256: str
    path: str
    files: list[str] = dataclasses.field(default_factory=list)
    partial: bool = False  # a checkpoint of an unfinished pre-fill (``ingest_resumable``)


@dataclass
class BrokenBook:
    """A directory of the library that is not a loadable book, and why (``scan``)."""

    id: str
    path: str
    error: str


def library_dir(directory: str | Path | None = None) -> Path:
    """The argument, else ``$DUO_QSERVE_LIBRARY``, else ``<repo>/library``."""
    return Path(directory) if directory else environment.library_dir()


# ---- public API ----------------------------------------------------------------------------------------------
def save(
    engine: Engine,
    directory: str | Path | None = None,
    on_progress: Progress | None = None,
    files: Sequence[str] = (),
) -> BookInfo:
    """Save the engine's document (its state right after the pre-fill) as a book; the same document saved with the
    same model and settings replaces the earlier book."""
    refuse_context_parallel(engine, "saving a book")
    with engine.job():
        doc = engine.document
        if doc is None:
            raise LibraryError("no document is loaded: ingest one before saving it")
        if doc.ids is None:
            raise LibraryError(
                f"the token ids of {doc.title!r} are not known here: ingest it again to save it"
            )
        engine.cache.restore()  # a question and its answer may have moved the tails and rings on
        identity = _identity(engine)
        book_id = _book_id(doc.title, doc.sha256, identity)
        meta = {"title": doc.title, "files": [Path(f).name for f in files], "partial": False,
                "tokens": doc.tokens, "token_sha256": doc.sha256, "prefill_seconds": doc.prefill_seconds}  # fmt: skip
        target = library_dir(directory) / book_id
        manifest = _write_book(engine, target, book_id, identity, meta, doc.ids, on_progress)
        return _info(manifest, library_dir(directory) / book_id)


def load(
    engine: Engine,
    book: BookInfo | str | Path,
    directory: str | Path | None = None,
    on_progress: Progress | None = None,
    loaded_by: str = "",
) -> DocumentInfo:
    """Load a saved book into the engine's cache, ready for questions. ``book`` is a ``BookInfo``, a book id or a
    book directory. The returned ``prefill_seconds`` is the time the load took (nothing was pre-filled)."""
    t0 = time.perf_counter()
    refuse_context_parallel(engine, "loading a book")
    path = _book_dir(book, directory)
    manifest = read_manifest(path)
    if manifest["partial"]:
        raise LibraryError(
            f"{path} holds an unfinished pre-fill ({manifest['tokens']:,} of {manifest['total_tokens']:,} tokens): "
            f"resume it with ingest_resumable, or save the document again"
        )
    with engine.job():
        _check_compatible(engine, manifest, path)
        ids = read_tokens(path, manifest)
        _load_data(engine, path, manifest, protect=engine.document is not None, on_progress=on_progress)
        seconds = time.perf_counter() - t0
        info = DocumentInfo(
            manifest["title"], manifest["tokens"], manifest["token_sha256"], seconds, loaded_by, ids=ids
        )
        return engine.attach_document(info)


def scan(directory: str | Path | None = None) -> tuple[list[BookInfo], list[BrokenBook]]:
    """The saved books, newest first, and the directories that are not loadable books (each with the reason):
    one damaged book never hides the others. Interrupted saves are recovered first (``recover``)."""
    root = library_dir(directory)
    if not root.is_dir():
        return [], []
    try:
        recover(root, wait=False)
    except OSError as e:  # e.g. a read-only library: list what is there
        log.warning("cannot recover interrupted saves in %s: %s", root, e)
    books, broken = [], []
    for d in sorted(root.iterdir()):
        if d.name.startswith("."):  # staged saves, resume checkpoints, the lock
            continue
        try:
            books.append(_info(read_manifest(d), d))
        except (LibraryError, OSError) as e:
            broken.append(BrokenBook(d.name, str(d), str(e)))
    return sorted(books, key=lambda b: b.created, reverse=True), broken


def list_books(directory: str | Path | None = None) -> list[BookInfo]:
    """The loadable saved books, newest first; the others are skipped with a log line (``scan`` lists them)."""
    books, broken = scan(directory)
    for b in broken:
        log.warning("skipping %s: %s", b.path, b.error)
    return books


def find_by_hash(
    token_sha256: str, directory: str | Path | None = None, engine: Engine | None = None
) -> list[BookInfo]:
    """Books of the document with these token ids; with ``engine``, only those that engine can load."""
    found = [b for b in list_books(directory) if b.token_sha256 == token_sha256]
    if engine is None:
        return found
    fits = []
    for b in found:
        try:
            if not _mismatches(engine, read_manifest(Path(b.path))):
                fits.append(b)
        except LibraryError as e:  # changed since it was listed
            log.warning("skipping %s: %s", b.path, e)
    return fits


def remove(book_id: str, directory: str | Path | None = None) -> None:
    path = _book_dir(book_id, directory, ids_only=True)
    shutil.rmtree(path)


def ingest_resumable(
    engine: Engine,
    ids: Sequence[int],
    checkpoint_dir: str | Path,
    every_chunks: int = 8,
    on_progress: Progress | None = None,
    title: str = "document",
    loaded_by: str = "",
) -> DocumentInfo:
    """``engine.ingest`` that survives being stopped: every ``every_chunks`` chunks the partial cache is saved to
    ``checkpoint_dir`` (a book directory, replaced atomically), and a later call with the same ids (or ids that
    start with the checkpointed ones) continues from there. A checkpoint of another document or other settings is
    ignored and overwritten. The checkpoint is deleted once the pre-fill completes: ``save`` keeps the document."""
    if every_chunks < 1:
        raise ValueError(f"every_chunks must be at least 1, got {every_chunks}")
    refuse_context_parallel(engine, "a resumable pre-fill")
    ids, ckpt = list(ids), Path(checkpoint_dir)
    done, finished = _resume_from(engine, ids, ckpt)
    if finished:  # a saved book of exactly these ids: nothing left to pre-fill
        return load(engine, ckpt, loaded_by=loaded_by)
    identity = _identity(engine)
    chunks = 0

    def progress(done: int, total: int) -> None:
        nonlocal chunks
        chunks += 1
        if done < total and chunks % every_chunks == 0:
            meta = {"title": title, "files": [], "partial": True, "tokens": done, "total_tokens": total,
                    "token_sha256": token_sha256(ids[:done]), "prefill_seconds": None}  # fmt: skip
            _write_book(engine, ckpt, ckpt.name, identity, meta, ids[:done], None)
        if on_progress:
            on_progress(done, total)

    with engine.job():
        info = engine.ingest(ids, on_progress=progress, title=title, loaded_by=loaded_by, resume=done > 0)
    shutil.rmtree(ckpt, ignore_errors=True)
    return info


# ---- identity and compatibility ------------------------------------------------------------------------------
def refuse_context_parallel(engine: Engine, action: str) -> None:
    """A book is one whole cache in position order; a rank of a context-parallel engine holds only its share of
    the retrieval tokens, so it can neither write nor read one (yet)."""
    if engine.group is not None:
        raise LibraryError(
            f"{action} is not available with context parallelism yet (each rank holds only its share of the "
            f"document's retrieval cache): run the engine in one process for the library"
        )


def _identity(engine: Engine) -> dict:
    """Everything the cache bytes depend on, as JSON values."""
    c: CacheConfig = engine.cache_config
    gates = np.ascontiguousarray(engine.pattern.gates, dtype=np.float64)
    return {
        "model": {
            "name": engine.loaded.name,
            "source": engine.loaded.source,
            "args": json.loads(json.dumps(engine.args.as_dict())),
            "weights_sha256": weights_sha256(engine.model),
        },
        "settings": {
            "dtype": str(engine.dtype).removeprefix("torch."),
            "w8a8": bool(engine.w8a8),
            "kv_bits": c.kv_bits,
            "key_group": c.key_group,
            "sink_tokens": c.sink_tokens,
            "recent_tokens": c.recent_tokens,
        },
        "pattern": {
            "name": engine.pattern.name,
            "gates_sha256": hashlib.sha256(gates.tobytes()).hexdigest(),
            "sparsity": engine.sparsity,
            "retrieval_heads": list(engine.retrieval_heads),
        },
    }


@torch.no_grad()
def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over each weight tensor's name, shape, dtype and a fixed sample of its bytes (evenly spaced
    windows): different weights of the same shape are caught without reading 16 GB."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        n, w, k = flat.numel(), WEIGHT_SAMPLE_BYTES, WEIGHT_SAMPLES
        if n > w * k:
            flat = torch.cat([flat[i * (n - w) // (k - 1) :][:w] for i in range(k)])
        h.update(flat.cpu().numpy().tobytes())
    return h.hexdigest()


def _mismatches(engine: Engine, manifest: dict) -> list[str]:
    """What differs between the engine and the book, each as 'saved with X, this engine uses Y'."""
    mine, out = _identity(engine), []
    saved_model, my_model = manifest["model"], mine["model"]
    if saved_model["name"] != my_model["name"]:
        out.append(f"saved with model {saved_model['name']}, this engine runs {my_model['name']}")
    else:
        for key, value in my_model["args"].items():
            if saved_model["args"].get(key) != value:
                out.append(
                    f"saved with a model of {key}={saved_model['args'].get(key)}, this one has {value}"
                )
    for key, value in mine["settings"].items():
        if manifest["settings"].get(key) != value:
            out.append(f"saved with {key}={manifest['settings'].get(key)}, this engine uses {key}={value}")
    saved_p, my_p = manifest["pattern"], mine["pattern"]
    if saved_p["gates_sha256"] != my_p["gates_sha256"]:
        out.append(f"saved with attention pattern {saved_p['name']}, this engine uses {my_p['name']}")
    if saved_p["sparsity"] != my_p["sparsity"]:
        out.append(
            f"saved with {saved_p['sparsity']:.1%} streaming heads, this engine uses {my_p['sparsity']:.1%}"
        )
    elif saved_p["retrieval_heads"] != my_p["retrieval_heads"]:
        out.append("saved with other retrieval heads per layer")
    if not out and saved_model["weights_sha256"] != my_model["weights_sha256"]:
        out.append(
            f"saved with other weights of model {saved_model['name']} (weight checksum "
            f"{saved_model['weights_sha256'][:12]}, this engine's {my_model['weights_sha256'][:12]})"
        )
    return out


def _check_compatible(engine: Engine, manifest: dict, path: Path) -> None:
    problems = _mismatches(engine, manifest)
    if problems:
        raise BookMismatch(
            f"book {path.name} does not fit this engine: {'; '.join(problems)}. Start the engine with the book's "
            f"settings, or ingest the document again"
        )
    if manifest["tokens"] > engine.max_document_tokens:
        raise BookMismatch(
            f"book {path.name} holds {manifest['tokens']:,} tokens but this engine's cache takes "
            f"{engine.max_document_tokens:,} document tokens: start it with a larger max_tokens"
        )
    layout = _layout(engine.cache, manifest["tokens"])
    if layout != manifest["data"]["tensors"]:
        raise BookMismatch(f"book {path.name}: its data layout differs from this engine's cache")


def _settings_line(manifest: dict) -> str:
    s, p = manifest["settings"], manifest["pattern"]
    kv = f"KV{s['kv_bits']}" if s["kv_bits"] < 16 else "fp KV"
    w8a8 = "W8A8, " if s["w8a8"] else ""
    return (
        f"{s['dtype']}, {w8a8}{kv}, {p['sparsity']:.0%} streaming heads, "
        f"sink {s['sink_tokens']} / recent {s['recent_tokens']}"
    )


# ---- the data file's layout ----------------------------------------------------------------------------------
def _layout(cache: DuoKVCache, seq_len: int) -> list[dict]:
    """Per cache tensor: its place in the data file. Capacity is left out: a book loads into a larger cache."""
    entries, offset = [], 0
    for layer, specs in enumerate(cache.spec.layers):
        for t in specs:
            heads, row_shape = t.shape[0], list(t.shape[2:])
            row_bytes = t.nbytes // (t.shape[0] * t.shape[1])
            valid = cache.spec.valid_len(t.name, seq_len)
            nbytes = heads * valid * row_bytes
            entries.append({"layer": layer, "name": t.name, "dtype": str(t.dtype).removeprefix("torch."),
                            "heads": heads, "row_shape": row_shape, "valid": valid, "offset": offset,
                            "nbytes": nbytes})  # fmt: skip
            offset += nbytes
    return entries


@dataclass
class _Segment:
    offset: int  # in the data file
    view: torch.Tensor  # 1-D uint8 view into the cache: one head's valid entries


def _segments(cache: DuoKVCache, layout: list[dict]) -> list[_Segment]:
    out = []
    for e in layout:
        if not e["nbytes"]:
            continue
        tensor = cache.layers[e["layer"]][e["name"]]
        rows = tensor.view(torch.uint8).reshape(tensor.shape[0], -1)
        per_head = e["nbytes"] // e["heads"]
        out += [_Segment(e["offset"] + h * per_head, rows[h, :per_head]) for h in range(e["heads"])]
    return out


def _spans(segments: list[_Segment], starts: list[int], lo: int, hi: int):
    """(cache view, offset within [lo, hi)) for every piece of the file range [lo, hi)."""
    i = max(bisect.bisect_right(starts, lo) - 1, 0)
    while i < len(segments) and segments[i].offset < hi:
        s = segments[i]
        a, b = max(s.offset, lo), min(s.offset + s.view.numel(), hi)
        if a < b:
            yield s.view[a - s.offset : b - s.offset], a - lo
        i += 1


# ---- streaming through the host buffer -----------------------------------------------------------------------
def _host_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _windows(total: int, block: int):
    """File ranges that fill the host buffer, each cut into blocks: [(lo, hi, [(b0, b1), ...]), ...]."""
    window = SLOTS * block
    for lo in range(0, total, window):
        hi = min(lo + window, total)
        yield lo, hi, [(b, min(b + block, hi)) for b in range(lo, hi, block)]


def _write_data(cache: DuoKVCache, layout: list[dict], path: Path, on_progress: Progress | None) -> list[str]:
    """Gather the valid state into the host buffer, hash and write it block by block; returns the block sha256s."""
    total = sum(e["nbytes"] for e in layout)
    segments = _segments(cache, layout)
    starts = [s.offset for s in segments]
    buf = _host_buffer(cache.device, min(SLOTS * BLOCK_BYTES, total) or 1)
    host = buf.numpy()
    digests: list[str] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with ThreadPoolExecutor(SLOTS) as pool:
            for lo, hi, blocks in _windows(total, BLOCK_BYTES):
                for view, at in _spans(segments, starts, lo, hi):
                    buf[at : at + view.numel()].copy_(view, non_blocking=True)
                _sync(cache.device)

                def write(block: tuple[int, int], lo: int = lo) -> str:
                    mv = memoryview(host[block[0] - lo : block[1] - lo])
                    offset = block[0]
                    digest = hashlib.sha256(mv).hexdigest()  # hashlib and os.pwrite release the GIL
                    while mv:
                        n = os.pwrite(fd, mv, offset)
                        mv, offset = mv[n:], offset + n
                    return digest

                digests += pool.map(write, blocks)
                if on_progress:
                    on_progress(hi, total)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digests


def _read_data(
    cache: DuoKVCache, manifest: dict, path: Path, copy_in: bool, progress: Callable[[int], None]
) -> None:
    """Read the data file block by block and check each block's sha256; with ``copy_in``, copy the verified
    blocks into the cache. Raises BookCorrupt at the first bad block."""
    data = manifest["data"]
    total, block, digests = data["bytes"], data["block_bytes"], data["blocks"]
    segments = _segments(cache, data["tensors"])
    starts = [s.offset for s in segments]
    buf = _host_buffer(cache.device, min(SLOTS * block, total) or 1)
    host = buf.numpy()
    fd = os.open(path / DATA, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(SLOTS) as pool:
            for lo, hi, blocks in _windows(total, block):

                def read(b: tuple[int, int], lo: int = lo) -> str:
                    mv = memoryview(host[b[0] - lo : b[1] - lo])
                    offset = b[0]
                    while mv:
                        n = os.preadv(fd, [mv], offset)
                        if n == 0:
                            raise BookCorrupt(f"{path / DATA} ends at {offset:,} bytes; {total:,} were saved")
                        mv, offset = mv[n:], offset + n
                    return hashlib.sha256(host[b[0] - lo : b[1] - lo]).hexdigest()

                for (b0, b1), digest in zip(blocks, pool.map(read, blocks), strict=True):
                    if digest != digests[b0 // block]:
                        raise BookCorrupt(
                            f"{path / DATA}: block {b0 // block} (bytes {b0:,}-{b1:,}) fails its checksum; the "
                            f"file is damaged: save the document again"
                        )
                if copy_in:
                    for view, at in _spans(segments, starts, lo, hi):
                        view.copy_(buf[at : at + view.numel()], non_blocking=True)
                    _sync(cache.device)  # the next window overwrites the buffer
                progress(hi - lo)
    finally:
        os.close(fd)


def _load_data(
    engine: Engine, path: Path, manifest: dict, protect: bool, on_progress: Progress | None = None
) -> None:
    """Copy a checked book's state into the engine's cache (see the module docstring for the two strategies)."""
    data = manifest["data"]
    size = (path / DATA).stat().st_size if (path / DATA).is_file() else -1
    if size != data["bytes"]:
        raise BookCorrupt(
            f"{path / DATA} has {max(size, 0):,} bytes but {data['bytes']:,} were saved: the file is truncated or "
            f"was replaced; save the document again"
        )
    total = data["bytes"] * (2 if protect else 1)
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done, total)

    if protect:
        _read_data(engine.cache, manifest, path, copy_in=False, progress=progress)
    engine.reset()
    try:
        _read_data(engine.cache, manifest, path, copy_in=True, progress=progress)
    except BaseException:
        engine.reset()  # a partly copied state is no document
        raise
    engine.cache.set_length(manifest["tokens"])


# ---- book files ----------------------------------------------------------------------------------------------
def _book_id(title: str, token_sha256: str, identity: dict) -> str:
    """Title slug + a short hash of the document and the settings: the same document saved with other settings is
    another book."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:48].strip("-") or "book"
    key = json.dumps([token_sha256, identity], sort_keys=True).encode()
    return f"{slug}-{hashlib.sha256(key).hexdigest()[:10]}"


def _write_book(
    engine: Engine,
    target: Path,
    book_id: str,
    identity: dict,
    meta: dict,
    ids: Sequence[int],
    on_progress: Progress | None,
) -> dict:
    """Write the book beside ``target`` and swap it in, so that at every instant a complete copy (the previous
    one or the new one) is at ``target`` or staged where ``recover`` puts it back:

    1. write ``.<id>.writing-<tag>/`` (data, tokens, then the manifest; each synced): a kill here leaves the old
       book;
    2. rename it to ``.<id>.new-<tag>``: complete from now on, recovery installs it;
    3. rename the old book (if any) to ``.<id>.old-<tag>``;
    4. rename the new copy to ``<id>``;
    5. delete the old copy.

    The library's lock is held throughout (another save waits; recovery skips a library being saved to).
    """
    root = target.parent
    with _library_lock(root, wait=True):
        recover(root, locked=True)
        tag = f"{os.getpid()}-{secrets.token_hex(4)}"
        writing, new, old = (root / f".{target.name}.{stage}-{tag}" for stage in ("writing", "new", "old"))
        writing.mkdir()
        try:
            layout = _layout(engine.cache, meta["tokens"])
            digests = _write_data(engine.cache, layout, writing / DATA, on_progress)
            write_tokens(writing / TOKENS, ids)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "book_id": book_id,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                **meta,
                "chunk_size": engine.chunk_size,
                **identity,
                "data": {
                    "file": DATA,
                    "bytes": sum(e["nbytes"] for e in layout),
                    "block_bytes": BLOCK_BYTES,
                    "blocks": digests,
                    "tensors": layout,
                },
            }
            with open(writing / MANIFEST, "w") as f:
                f.write(json.dumps(manifest, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(writing)
        except BaseException:
            shutil.rmtree(writing, ignore_errors=True)
            raise
        os.rename(writing, new)
        if target.exists():
            os.rename(target, old)
        os.rename(new, target)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    return manifest


def recover(directory: str | Path | None = None, wait: bool = False, locked: bool = False) -> None:
    """Finish or undo the saves that were interrupted (killed) in ``directory``: a complete new copy is put in
    place of its book, a replaced copy is deleted once its book is back (or put back if it is not), and partly
    written copies are deleted. Runs only when no save holds the library's lock (``wait``: wait for it;
    ``locked``: the caller holds it), so a save in progress in any process is never touched."""
    root = library_dir(directory)
    if not locked:
        with _library_lock(root, wait) as held:
            if held:
                recover(root, locked=True)
        return
    staged = sorted(
        (m["stage"] != "writing", m["stage"] == "old", m["book"], d)
        for d in root.iterdir()
        if (m := _STAGED.fullmatch(d.name)) and d.is_dir() and not d.is_symlink()
    )  # writing first, then new, then old
    for _, _, book, d in staged:
        target, stage = root / book, _STAGED.fullmatch(d.name)["stage"]
        if stage == "writing":
            log.warning("deleting %s: a save of %s that was stopped before it was complete", d, book)
            shutil.rmtree(d, ignore_errors=True)
        elif stage == "new":
            log.warning("installing %s as %s: a save that was stopped just before it was swapped in", d, book)
            old = d.with_name(d.name.replace(".new-", ".old-", 1))
            if target.exists():
                os.rename(target, old)
            os.rename(d, target)
            shutil.rmtree(old, ignore_errors=True)
        elif target.exists():
            shutil.rmtree(d, ignore_errors=True)
        else:
            log.warning("putting %s back as %s: its replacement never arrived", d, book)
            os.rename(d, target)
    if staged:
        _fsync_dir(root)


@contextmanager
def _library_lock(root: Path, wait: bool) -> Iterator[bool]:
    """Hold the library's exclusive lock (an flock on ``<root>/.lock``, released by the kernel if the process
    dies); yields False instead when ``wait`` is False and another save holds it."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _book_dir(book: BookInfo | str | Path, directory: str | Path | None, ids_only: bool = False) -> Path:
    if isinstance(book, BookInfo):
        return Path(book.path)
    root = library_dir(directory)
    name = str(book)
    if name and Path(name).name == name and not name.startswith(".") and (root / name / MANIFEST).is_file():
        return root / name
    if not ids_only and (Path(book) / MANIFEST).is_file():
        return Path(book)
    raise LibraryError(
        f"no book {name!r} in {root}: `python -m duo_qserve library list` shows the saved books"
    )


def _info(manifest: dict, path: Path) -> BookInfo:
    return BookInfo(
        id=path.name,
        title=manifest["title"],
        tokens=manifest["tokens"],
        bytes=manifest["data"]["bytes"],
        created=manifest["created"],
        model=manifest["model"]["name"],
        settings=_settings_line(manifest),
        token_sha256=manifest["token_sha256"],
        path=str(path),
        files=list(manifest.get("files", [])),
        partial=bool(manifest["partial"]),
    )


def _resume_from(engine: Engine, ids: list[int], ckpt: Path) -> tuple[int, bool]:
    """Load a usable partial checkpoint into the cache. Returns the tokens it holds (0: start from the beginning)
    and whether it is instead a finished book of exactly these ids (left for ``load``)."""
    if not (ckpt / MANIFEST).is_file():
        return 0, False
    try:
        manifest = read_manifest(ckpt)
        done = manifest["tokens"]
        if done > len(ids) or token_sha256(ids[:done]) != manifest["token_sha256"]:
            log.warning("%s is a checkpoint of another document; starting the pre-fill over", ckpt)
            return 0, False
        _check_compatible(engine, manifest, ckpt)
        if done == len(ids) and not manifest["partial"]:
            return done, True
        read_tokens(ckpt, manifest)
        _load_data(engine, ckpt, manifest, protect=False)
    except LibraryError as e:
        log.warning("cannot resume from %s (%s); starting the pre-fill over", ckpt, e)
        return 0, False
    log.info("resuming the pre-fill at token %d of %d from %s", done, len(ids), ckpt)
    return done, False


def book_settings(book: BookInfo | str | Path, directory: str | Path | None = None) -> EngineSettings:
    """The engine settings a saved book was made with (model source, pattern, sparsity, KV and W8A8 settings,
    windows, dtype): an engine built from them can load it."""
    manifest = read_manifest(_book_dir(book, directory))
    s, p = manifest["settings"], manifest["pattern"]
    return EngineSettings(
        model=manifest["model"]["source"], dtype=getattr(torch, s["dtype"]),
        pattern=None if p["name"] == UNIFORM_PATTERN_NAME else p["name"], sparsity=p["sparsity"],
        kv_bits=s["kv_bits"], key_group=s["key_group"], sink=s["sink_tokens"], recent=s["recent_tokens"],
        w8a8=s["w8a8"],
    )  # fmt: skip
