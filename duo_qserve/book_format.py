"""The on-disk format of a saved book, and its checks: what a book directory holds and what a valid manifest is.

A book is a directory ``<library>/<book_id>/`` with three files:

- ``manifest.json``: what the cache was made with (model name, shape and a weight checksum; dtype, W8A8 and KV
  settings; the attention pattern's gates hash, achieved sparsity and per-layer retrieval heads; sink/recent), the
  document (title, files, token count, sha256 of its int64 token ids), the byte layout of the data file and one
  sha256 per block of it.
- ``cache.bin``: the checkpointed state only (whole quantized groups, scales, fp tails, sinks, rings; for every
  tensor just the entries valid at the document's length, head by head in ``CacheSpec`` order), cut into blocks of
  the manifest's ``data.block_bytes``;
- ``tokens.bin``: the document's token ids as little-endian int64, so its sha256 is the manifest's
  ``token_sha256``: a load checks one against the other, and the ids give answers' evidence passages their text.

``read_manifest`` checks a book's files and every field of its manifest (``FIELDS``: type, range, agreement with
the data layout) without an engine; whether a book fits the running engine, and moving the cache's bytes to and
from ``cache.bin``, are ``duo_qserve.library``'s. Every problem is a ``LibraryError`` that names the book and
says what to do.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

FORMAT = "duo-qserve-book"
FORMAT_VERSION = 2  # 2: tokens.bin
MANIFEST = "manifest.json"
DATA = "cache.bin"
TOKENS = "tokens.bin"
FILES = (MANIFEST, DATA, TOKENS)
MAX_BLOCK_BYTES = 1 << 30  # a manifest asking for larger blocks would make the host buffer unbounded
MAX_MANIFEST_BYTES = 64 << 20  # far above any real manifest (one line per 64 MB block and cache tensor)


class LibraryError(ValueError):
    """A book that cannot be saved, found or loaded; the message says why and what to do."""


class BookMismatch(LibraryError):
    """The book was saved by an engine with another model or other settings."""


class BookCorrupt(LibraryError):
    """The book's files are damaged or incomplete."""


def read_manifest(path: Path) -> dict:
    """The book's manifest, every field checked for type, range and consistency with the data layout; any
    problem is a LibraryError naming the book and the field."""
    _check_files(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BookCorrupt(
            f"book {path.name}: {MANIFEST} cannot be read ({e}): save the document again"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BookCorrupt(f"book {path.name}: {MANIFEST} is not a duo-qserve book manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BookMismatch(
            f"{path.name} was written in book format {manifest.get('format_version')!r}; this duo_qserve reads "
            f"format {FORMAT_VERSION}: save the document again"
        )
    for name, (ok, expected) in FIELDS.items():
        _check_field(path, manifest, name, ok, expected)
    if manifest["partial"]:
        _check_field(
            path,
            manifest,
            "total_tokens",
            lambda v: _int(v) and v > manifest["tokens"],
            "an integer above tokens",
        )
    else:
        _check_field(path, manifest, "prefill_seconds", _seconds, "a finite number >= 0")
    _check_data(path, manifest)
    return manifest


def write_tokens(path: Path, ids: Sequence[int]) -> None:
    with open(path, "wb") as f:
        f.write(np.asarray(ids, dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_tokens(path: Path, manifest: dict) -> np.ndarray:
    """The book's token ids (int32, as the engine keeps them), checked against the manifest's token_sha256."""
    size, expected = (path / TOKENS).stat().st_size, 8 * manifest["tokens"]
    if size != expected:
        raise BookCorrupt(f"book {path.name}: {TOKENS} has {size:,} bytes, but {manifest['tokens']:,} token ids "
                          f"make {expected:,}: save the document again")  # fmt: skip
    raw = (path / TOKENS).read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest["token_sha256"]:
        raise BookCorrupt(f"book {path.name}: its token ids do not match the manifest's token_sha256 (one of "
                          f"them was changed): save the document again")  # fmt: skip
    return np.frombuffer(raw, dtype="<i8").astype(np.int32)


def _check_files(path: Path) -> None:
    """A book is a real directory holding exactly its three regular files (no links, nothing else)."""
    if path.is_symlink() or not path.is_dir():
        raise LibraryError(f"{path} is not a book: a book is a directory (not a link) holding {MANIFEST}")
    names = {p.name for p in path.iterdir()}
    if MANIFEST not in names:
        raise LibraryError(f"{path} is not a book: it has no {MANIFEST}")
    extra, missing = sorted(names - set(FILES)), sorted(set(FILES) - names)
    if extra or missing:
        found = ", ".join([f"unexpected {n}" for n in extra] + [f"no {n}" for n in missing])
        raise BookCorrupt(f"book {path.name} should hold {', '.join(FILES)} only, but has {found}: "
                          f"save the document again")  # fmt: skip
    for name in FILES:
        mode = os.lstat(path / name).st_mode
        if not stat.S_ISREG(mode):
            raise BookCorrupt(f"book {path.name}: {name} is not a regular file (a link or a device): save the "
                              f"document again")  # fmt: skip
    if (path / MANIFEST).stat().st_size > MAX_MANIFEST_BYTES:
        raise BookCorrupt(f"book {path.name}: {MANIFEST} is over {MAX_MANIFEST_BYTES >> 20} MiB, far larger than a "
                          f"manifest: save the document again")  # fmt: skip


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _count(v: object) -> bool:
    return _int(v) and v >= 0


def _sha(v: object) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


def _seconds(v: object) -> bool:
    return (_int(v) or isinstance(v, float)) and math.isfinite(v) and v >= 0


def _iso_time(v: object) -> bool:
    try:
        return isinstance(v, str) and datetime.datetime.fromisoformat(v).tzinfo is not None
    except ValueError:
        return False


def _dtype_name(v: object) -> bool:
    return isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype)


_STR = (lambda v: isinstance(v, str), "a string")
_COUNT = (_count, "an integer >= 0")
_SHA = (_sha, "a sha256 (64 lowercase hex digits)")
FIELDS = {  # dotted path: (test, what it should be)
    "book_id": _STR,
    "created": (_iso_time, "an ISO 8601 time with a time zone"),
    "title": _STR,
    "files": (lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v), "a list of file names"),
    "partial": (lambda v: isinstance(v, bool), "true or false"),
    "tokens": (lambda v: _int(v) and v > 0, "an integer > 0"),
    "token_sha256": _SHA,
    "chunk_size": (lambda v: _int(v) and v > 0, "an integer > 0"),
    "model.name": _STR,
    "model.source": _STR,
    "model.args": (lambda v: isinstance(v, dict), "an object"),
    "model.weights_sha256": _SHA,
    "settings.dtype": (_dtype_name, "a torch dtype name"),
    "settings.w8a8": (lambda v: isinstance(v, bool), "true or false"),
    "settings.kv_bits": (lambda v: _int(v) and v in (4, 8, 16), "4, 8 or 16"),
    "settings.key_group": (lambda v: _int(v) and v > 0, "an integer > 0"),
    "settings.sink_tokens": _COUNT,
    "settings.recent_tokens": _COUNT,
    "pattern.name": _STR,
    "pattern.gates_sha256": _SHA,
    "pattern.sparsity": (lambda v: _seconds(v) and v <= 1, "a number in [0, 1]"),
    "pattern.retrieval_heads": (
        lambda v: isinstance(v, list) and all(_count(h) for h in v),
        "a list of counts",
    ),
    "data.file": (lambda v: v == DATA, repr(DATA)),
    "data.bytes": _COUNT,
    "data.block_bytes": (
        lambda v: _int(v) and 0 < v <= MAX_BLOCK_BYTES,
        f"an integer in [1, {MAX_BLOCK_BYTES:,}]",
    ),
    "data.blocks": (lambda v: isinstance(v, list) and all(_sha(d) for d in v), "a list of sha256s"),
    "data.tensors": (
        lambda v: isinstance(v, list) and all(isinstance(e, dict) for e in v),
        "a list of objects",
    ),
}
_TENSOR_FIELDS = {
    "layer": _COUNT,
    "name": _STR,
    "dtype": (_dtype_name, "a torch dtype name"),
    "heads": (lambda v: _int(v) and v > 0, "an integer > 0"),
    "row_shape": (lambda v: isinstance(v, list) and all(_int(n) and n > 0 for n in v), "a list of sizes"),
    "valid": _COUNT,
    "offset": _COUNT,
    "nbytes": _COUNT,
}


def _check_field(path: Path, manifest: dict, name: str, ok: Callable[[object], bool], expected: str) -> None:
    value: object = manifest
    for key in name.split("."):
        if not isinstance(value, dict) or key not in value:
            raise BookCorrupt(f"book {path.name}: its manifest lacks {name}: save the document again")
        value = value[key]
    if not ok(value):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise BookCorrupt(
            f"book {path.name}: manifest field {name} is {shown}, expected {expected}: save the document again"
        )


def _check_data(path: Path, manifest: dict) -> None:
    """The data section agrees with itself: contiguous tensors whose sizes add up to ``data.bytes``, one
    checksum per block, and one layer of retrieval heads per layer the tensors name."""
    data = manifest["data"]
    offset = 0
    for i, entry in enumerate(data["tensors"]):
        for key, (ok, expected) in _TENSOR_FIELDS.items():
            if key not in entry or not ok(entry[key]):
                raise BookCorrupt(f"book {path.name}: manifest field data.tensors[{i}].{key} is "
                                  f"{entry.get(key)!r}, expected {expected}: save the document again")  # fmt: skip
        itemsize = getattr(torch, entry["dtype"]).itemsize
        size = entry["heads"] * entry["valid"] * math.prod(entry["row_shape"]) * itemsize
        if entry["nbytes"] != size or entry["offset"] != offset:
            raise BookCorrupt(
                f"book {path.name}: manifest field data.tensors[{i}] ({entry['name']} of layer {entry['layer']}) "
                f"says {entry['nbytes']:,} bytes at offset {entry['offset']:,}, but its shape makes {size:,} bytes "
                f"at offset {offset:,}: save the document again"
            )
        if entry["layer"] >= len(manifest["pattern"]["retrieval_heads"]):
            raise BookCorrupt(f"book {path.name}: manifest field data.tensors[{i}].layer is {entry['layer']}, but "
                              f"pattern.retrieval_heads has {len(manifest['pattern']['retrieval_heads'])} layers")  # fmt: skip
        offset += size
    if data["bytes"] != offset:
        raise BookCorrupt(f"book {path.name}: manifest field data.bytes is {data['bytes']:,}, but its tensors "
                          f"hold {offset:,} bytes: save the document again")  # fmt: skip
    blocks = -(-data["bytes"] // data["block_bytes"])
    if len(data["blocks"]) != blocks:
        raise BookCorrupt(f"book {path.name}: manifest field data.blocks has {len(data['blocks'])} checksums, but "
                          f"{data['bytes']:,} bytes make {blocks} blocks: save the document again")  # fmt: skip
