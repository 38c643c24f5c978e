"""Hostile libraries: damaged, edited, incomplete or linked book files are refused with a clear LibraryError, never
break the listing of the other books, and leave the document already loaded in the engine answering as before;
a save killed at any step leaves a complete book (the old one or the new one) after start-up recovery."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_args, tiny_model

from duo_qserve import book_format, library
from duo_qserve.engine import Engine, EngineSettings
from duo_qserve.environment import REPO_ROOT
from duo_qserve.loading import LoadedModel

ANSWER_TOKENS = 4
DOC = [(i * 37 + 11) % 97 for i in range(300)]  # two whole key groups and a tail; the rings wrap


def tiny_engine() -> Engine:
    """A random two-layer model without a tokenizer (answers are token ids decoded by nobody): fast to build."""
    loaded = LoadedModel(tiny_model(tiny_args()), None, "tiny", "tiny")
    return Engine(
        loaded, EngineSettings(pattern=None, max_tokens=2048, chunk_size=64, w8a8=False, sink=8, recent=32)
    )


def answer_ids(engine: Engine) -> list[int]:
    """The greedy continuation of the document (the engine has no tokenizer to ask a question with)."""
    engine.cache.restore()
    logits = engine._prefill([5, 6, 7])
    out = []
    for _ in range(ANSWER_TOKENS):
        out.append(int(logits[-1].argmax()))
        logits = engine._decode_step(out[-1])
    engine.cache.restore()
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    engine = tiny_engine()
    engine.ingest(DOC, title="hostile")
    lib = tmp_path_factory.mktemp("library")
    book = library.save(engine, lib, files=["old.txt"])
    return {"lib": lib, "book": book, "answer": answer_ids(engine)}


@pytest.fixture(scope="module")
def loaded(saved):
    """The engine that must not be disturbed by any refused load."""
    engine = tiny_engine()
    library.load(engine, saved["book"].id, saved["lib"])
    assert answer_ids(engine) == saved["answer"]
    return engine


# ---- the damage -----------------------------------------------------------------------------------------------
def edit(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _walk(manifest: dict, field: str) -> tuple[dict, str]:
    *parents, key = field.split(".")
    for p in parents:
        manifest = manifest[p]
    return manifest, key


def delete(field):
    def change(m):
        parent, key = _walk(m, field)
        del parent[key]

    return change


def set_to(field, value):
    def change(m):
        parent, key = _walk(m, field)
        parent[key] = value

    return change


def wrong_type(field):
    """A value of another JSON type than the field's."""

    def change(m):
        parent, key = _walk(m, field)
        parent[key] = "x" if isinstance(parent[key], (dict, list)) else {"x": 1}

    return change


def editing(change):
    return lambda path: edit(path, change)


FIELD_CASES = [
    (f"{how} {field}", editing(make(field)), field.replace(".", r"\."))
    for field in book_format.FIELDS
    for how, make in (("deleted", delete), ("wrong type", wrong_type))
]

RANGE_CASES = [
    ("tokens 0", set_to("tokens", 0), "tokens"),
    ("tokens -5", set_to("tokens", -5), "tokens"),
    ("tokens true", set_to("tokens", True), "tokens"),
    ("tokens float", set_to("tokens", 300.0), "tokens"),
    ("kv_bits 3", set_to("settings.kv_bits", 3), "kv_bits"),
    ("key_group 0", set_to("settings.key_group", 0), "key_group"),
    ("sink -1", set_to("settings.sink_tokens", -1), "sink_tokens"),
    ("sparsity 1.5", set_to("pattern.sparsity", 1.5), "sparsity"),
    ("sparsity NaN", set_to("pattern.sparsity", float("nan")), "sparsity"),
    ("block_bytes 0", set_to("data.block_bytes", 0), "block_bytes"),
    ("block_bytes huge", set_to("data.block_bytes", 1 << 40), "block_bytes"),
    ("data.file elsewhere", set_to("data.file", "../../etc/passwd"), r"data\.file"),
    ("created no zone", set_to("created", "2024-01-01T00:00:00"), "created"),
    ("created garbage", set_to("created", "yesterday"), "created"),
    ("token_sha256 short", set_to("token_sha256", "abc"), "token_sha256"),
    ("token_sha256 another document's", set_to("token_sha256", "ab" * 32), "do not match the manifest's"),
    ("dtype unknown", set_to("settings.dtype", "float128"), "dtype"),
    ("retrieval heads negative", set_to("pattern.retrieval_heads", [-1, 2]), "retrieval_heads"),
    ("prefill_seconds deleted", delete("prefill_seconds"), "prefill_seconds"),
    ("prefill_seconds negative", set_to("prefill_seconds", -1.0), "prefill_seconds"),
    ("partial without total", set_to("partial", True), "total_tokens"),
    ("format version", set_to("format_version", 0), "book format 0"),
    ("format", set_to("format", "zip"), "not a duo-qserve book manifest"),
]


def _tensor(i, key, value):
    def change(m):
        m["data"]["tensors"][i][key] = value

    return change


def _bytes_plus_one(m):
    m["data"]["bytes"] += 1


def _drop_block(m):
    m["data"]["blocks"].pop()


def _drop_tensor(m):
    m["data"]["tensors"].pop(1)


def _shift_offsets(m):
    for e in m["data"]["tensors"][1:]:
        e["offset"] += 1


def _bigger_tensor(m):
    e = m["data"]["tensors"][0]
    e["valid"] += 1
    e["nbytes"] = e["nbytes"] // (e["valid"] - 1) * e["valid"]


def _fewer_layers(m):
    m["pattern"]["retrieval_heads"] = m["pattern"]["retrieval_heads"][:1]


def _layout_tensor_field_deleted(m):
    del m["data"]["tensors"][2]["row_shape"]


CONSISTENCY_CASES = [
    ("data.bytes against the layout", _bytes_plus_one, r"data\.bytes is .* its tensors hold"),
    ("a block checksum missing", _drop_block, r"data\.blocks has \d+ checksums"),
    ("a tensor missing", _drop_tensor, r"data\.tensors\[1\]|data layout differs"),
    ("tensor offsets shifted", _shift_offsets, r"data\.tensors\[1\]"),
    ("tensor nbytes wrong", _tensor(0, "nbytes", 12), r"data\.tensors\[0\]"),
    ("tensor dtype wrong", _tensor(0, "dtype", "float64"), r"data\.tensors\[0\]"),
    ("tensor heads zero", _tensor(3, "heads", 0), r"data\.tensors\[3\]\.heads"),
    ("tensor valid negative", _tensor(0, "valid", -1), r"data\.tensors\[0\]\.valid"),
    ("tensor row_shape deleted", _layout_tensor_field_deleted, r"data\.tensors\[2\]\.row_shape"),
    ("tensor name unknown", _tensor(0, "name", "k_secret"), "data layout differs"),
    ("tensor grown consistently", _bigger_tensor, r"data\.bytes|data\.tensors|data layout differs"),
    ("a layer beyond the heads", _fewer_layers, r"data\.tensors\[\d+\]\.layer|retrieval heads"),
    ("tokens against the layout", set_to("tokens", 299), "data layout differs"),
    ("a block checksum edited", lambda m: m["data"]["blocks"].__setitem__(0, "0" * 64), "fails its checksum"),
]
CONSISTENCY_CASES = [(n, editing(c), msg) for n, c, msg in CONSISTENCY_CASES]
RANGE_CASES = [(n, editing(c), msg) for n, c, msg in RANGE_CASES]


def _rewrite(name, data):
    def damage(p):
        (p / name).write_bytes(data(p / name))

    return damage


def _symlink_to_copy(name):
    def damage(p):
        real = p.parent.parent / f"elsewhere-{name}"
        shutil.copy(p / name, real)
        (p / name).unlink()
        (p / name).symlink_to(real)

    return damage


def _flip(offset):
    def data(path):
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0x40
        return bytes(raw)

    return data


FILE_CASES = [
    ("cache.bin truncated", _rewrite("cache.bin", lambda f: f.read_bytes()[:-100]), "truncated"),
    ("cache.bin empty", _rewrite("cache.bin", lambda f: b""), "truncated"),
    ("cache.bin longer", _rewrite("cache.bin", lambda f: f.read_bytes() + b"\0"), "truncated or"),
    ("cache.bin first byte flipped", _rewrite("cache.bin", _flip(0)), r"block 0 .* fails its checksum"),
    ("cache.bin last byte flipped", _rewrite("cache.bin", _flip(-1)), "fails its checksum"),
    ("manifest bad JSON", _rewrite("manifest.json", lambda f: f.read_bytes()[:-20]), "cannot be read"),
    ("manifest empty", _rewrite("manifest.json", lambda f: b""), "cannot be read"),
    (
        "manifest not UTF-8",
        _rewrite("manifest.json", lambda f: b"\xff\xfe" + f.read_bytes()),
        "cannot be read",
    ),
    ("manifest a list", _rewrite("manifest.json", lambda f: b"[1, 2]"), "not a duo-qserve book manifest"),
    ("manifest null", _rewrite("manifest.json", lambda f: b"null"), "not a duo-qserve book manifest"),
    ("an extra file", lambda p: (p / "notes.txt").write_text("hi"), "unexpected notes.txt"),
    ("cache.bin missing", lambda p: (p / "cache.bin").unlink(), "no cache.bin"),
    ("manifest missing", lambda p: (p / "manifest.json").unlink(), "no book '.*bad'"),
    (
        "cache.bin a directory",
        lambda p: ((p / "cache.bin").unlink(), (p / "cache.bin").mkdir()),
        "regular file",
    ),
    ("cache.bin a symlink", _symlink_to_copy("cache.bin"), "regular file"),
    ("tokens.bin missing", lambda p: (p / "tokens.bin").unlink(), "no tokens.bin"),
    ("tokens.bin truncated", _rewrite("tokens.bin", lambda f: f.read_bytes()[:-8]), "tokens.bin has"),
    (
        "tokens.bin one id changed",
        _rewrite("tokens.bin", _flip(-8)),
        "do not match the manifest's token_sha256",
    ),
    ("tokens.bin a symlink", _symlink_to_copy("tokens.bin"), "regular file"),
    ("manifest a symlink", _symlink_to_copy("manifest.json"), "regular file"),
]

CASES = FIELD_CASES + RANGE_CASES + CONSISTENCY_CASES + FILE_CASES


def test_there_are_many_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize("damage, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_book_is_refused_listed_apart_and_the_loaded_book_still_answers(
    saved, loaded, tmp_path, damage, message
):
    lib = shutil.copytree(saved["lib"], tmp_path / "lib")
    bad = lib / "bad"
    shutil.copytree(lib / saved["book"].id, bad)
    damage(bad)
    document = loaded.document
    with pytest.raises(library.LibraryError, match=message) as e:
        library.load(loaded, bad)
    assert "bad" in str(e.value) or "cache.bin" in str(e.value)  # names the book or its file
    assert loaded.document is document
    assert answer_ids(loaded) == saved["answer"]
    books, broken = library.scan(lib)
    assert saved["book"].id in [b.id for b in books]  # the good book is still listed
    assert [b.id for b in broken] in (["bad"], [])  # damage to the data shows when it is read
    if broken:
        assert [b.id for b in books] == [saved["book"].id]


def test_a_symlinked_book_and_stray_files_do_not_break_listing(saved, tmp_path):
    lib = shutil.copytree(saved["lib"], tmp_path / "lib")
    (lib / "linked").symlink_to(lib / saved["book"].id, target_is_directory=True)
    (lib / "stray.txt").write_text("not a book")
    (lib / "empty").mkdir()
    books, broken = library.scan(lib)
    assert [b.id for b in books] == [saved["book"].id]
    assert sorted(b.id for b in broken) == ["empty", "linked", "stray.txt"]
    assert all("not a book" in b.error for b in broken)
    with pytest.raises(library.LibraryError, match="not a book"):
        library.load(tiny_engine(), lib / "linked")


# ---- killed saves -----------------------------------------------------------------------------------------------
KILLER = """
import os, shutil, sys
sys.path.insert(0, {tests!r})
from test_hostile_library import tiny_engine
from duo_qserve import library
lib, book, call, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
engine = tiny_engine()
library.load(engine, book, lib)
module = shutil if call == "rmtree" else os
real, seen = getattr(module, call), []
def dying(*args, **kwargs):
    seen.append(args)
    if len(seen) == nth:
        os._exit(9)  # no clean-up runs, as with SIGKILL
    return real(*args, **kwargs)
setattr(module, call, dying)
library.save(engine, lib, files=["new.txt"])
os._exit(0)
"""

# (the call the save dies in, which one of them, the copy that must survive)
KILL_POINTS = [
    ("fsync", 1, "old.txt"),  # cache.bin written, not yet synced; no manifest
    ("fsync", 2, "old.txt"),  # tokens.bin written, not yet synced; no manifest
    ("rename", 1, "old.txt"),  # complete, not yet marked complete
    ("rename", 2, "new.txt"),  # complete and marked; the old book still in place
    ("rename", 3, "new.txt"),  # the old book moved aside, the new one not yet in place
    ("rmtree", 1, "new.txt"),  # swapped in; the old copy not yet deleted
]


@pytest.mark.parametrize("call, nth, survivor", KILL_POINTS)
def test_a_save_killed_at_any_step_leaves_a_complete_book(saved, tmp_path, call, nth, survivor):
    lib = shutil.copytree(saved["lib"], tmp_path / "lib")
    book_id = saved["book"].id
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    script = KILLER.format(tests=str(Path(__file__).parent))
    res = subprocess.run(
        [sys.executable, "-c", script, str(lib), book_id, call, str(nth)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 9, res.stderr[-3000:]
    books = library.list_books(lib)  # start-up: recovers
    assert [b.id for b in books] == [book_id]
    assert books[0].files == [survivor]
    assert sorted(p.name for p in lib.iterdir()) == [".lock", book_id]  # nothing staged is left
    engine = tiny_engine()
    library.load(engine, book_id, lib)
    assert answer_ids(engine) == saved["answer"]


def test_stale_staging_of_a_live_save_is_left_alone(saved, tmp_path):
    lib = shutil.copytree(saved["lib"], tmp_path / "lib")
    staged = lib / f".{saved['book'].id}.writing-1-0123abcd"
    staged.mkdir()
    with library._library_lock(lib, wait=True):  # a save in progress (here: this process)
        library.list_books(lib)
        assert staged.exists()
    library.list_books(lib)
    assert not staged.exists()
