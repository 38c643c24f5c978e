"""Book library: saved caches load back exactly, damaged or foreign books are refused, stopped pre-fills resume."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import haystack_text

from duo_qserve import library
from duo_qserve.__main__ import main as cli
from duo_qserve.engine import Cancelled, Engine
from duo_qserve.library_cli import print_progress
from duo_qserve.patterns import random_pattern, save_pattern

QUESTION = "What is the first essay about?"
ANSWER_TOKENS = 8
CHUNK = 128


def make_engine(pattern_dir, **overrides) -> Engine:
    settings = dict(max_tokens=2048, chunk_size=CHUNK, pattern=str(pattern_dir), sparsity=0.5, w8a8=False)
    return Engine.from_pretrained("default", **{**settings, **overrides})


def valid_state(engine: Engine) -> dict[tuple[int, str], torch.Tensor]:
    """Every cache entry that holds state at the current length (written out here independently of the library);
    with a document loaded, at its end (a question moves the tails and rings on)."""
    cache, c = engine.cache, engine.cache_config
    if engine.document is not None:
        cache.restore()
    n = cache.seq_len
    whole = n // c.key_group * c.key_group
    valid = {"k_data": whole, "v_data": whole, "v_scale": whole, "v_zero": whole,
             "k_scale": whole // c.key_group, "k_zero": whole // c.key_group, "k_tail": n - whole,
             "v_tail": n - whole, "sink_k": min(n, c.sink_tokens), "sink_v": min(n, c.sink_tokens),
             "ring_k": min(max(n - c.sink_tokens, 0), c.recent_tokens),
             "ring_v": min(max(n - c.sink_tokens, 0), c.recent_tokens)}  # fmt: skip
    return {
        (i, name): t[:, : valid[name]].clone()
        for i, layer in enumerate(cache.layers)
        for name, t in layer.items()
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"layer {key[0]} {key[1]} differs"


def answer(engine: Engine) -> str:
    return engine.answer(QUESTION, max_new_tokens=ANSWER_TOKENS)


@pytest.fixture(scope="module", autouse=True)
def small_blocks():
    """Blocks of 256 KiB so the few-MB test books span many blocks and several host-buffer windows."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(library, "BLOCK_BYTES", 256 << 10)
        yield


@pytest.fixture(scope="module")
def pattern_dir(tmp_path_factory):
    from duo_qserve.model import PRESETS, ModelArgs

    gates = random_pattern(ModelArgs(**PRESETS["smollm2-135m"]), seed=1).gates
    # sink + recent well below the document's length, so the rings wrap
    return save_pattern(tmp_path_factory.mktemp("pattern"), gates, {"sink_size": 16, "recent_size": 64})


@pytest.fixture(scope="module")
def original(pattern_dir, tmp_path_factory):
    """The uninterrupted session: pre-fill, answer, save."""
    engine = make_engine(pattern_dir)
    ids = engine.document_ids(haystack_text(3000))
    assert 600 <= len(ids) <= 1000 and len(ids) % CHUNK  # a partial last chunk (and key group: CHUNK == 128)
    engine.ingest(ids, title="Paul Graham essays")
    reply = answer(engine)
    lib = tmp_path_factory.mktemp("library")
    seen = []
    book = library.save(
        engine, lib, on_progress=lambda done, total: seen.append((done, total)), files=["a/b.txt"]
    )
    assert seen[-1] == (book.bytes, book.bytes) and len(seen) > 1
    engine.cache.restore()
    state = valid_state(engine)
    return {"engine": engine, "ids": ids, "answer": reply, "book": book, "lib": lib, "state": state}


@pytest.fixture(scope="module")
def loaded(pattern_dir, original):
    """A fresh engine (as after a restart) that loaded the book."""
    engine = make_engine(pattern_dir)
    info = library.load(engine, original["book"].id, original["lib"])
    assert (
        info.tokens == original["engine"].document.tokens
        and info.sha256 == original["engine"].document.sha256
    )
    return engine


def test_loaded_book_answers_like_the_original_session(original, loaded):
    assert_same_state(valid_state(loaded), original["state"])
    assert answer(loaded) == original["answer"]
    assert loaded.prefilled_tokens < 100  # only the question and answer went through the model


def test_loaded_book_has_the_documents_token_ids(original, loaded):
    """The ids come back from tokens.bin (evidence passages quote them), and they are the ingested ones."""
    assert loaded.document.ids.tolist() == original["engine"].document.ids.tolist()
    assert len(loaded.document.ids) == loaded.document.tokens


def test_manifest_describes_the_cache(original):
    book = original["book"]
    manifest = json.loads((original["lib"] / book.id / "manifest.json").read_text())
    doc = original["engine"].document
    assert (manifest["tokens"], manifest["token_sha256"], manifest["title"]) == (
        doc.tokens,
        doc.sha256,
        doc.title,
    )
    assert manifest["settings"]["kv_bits"] == 4 and manifest["pattern"]["sparsity"] == 0.5
    assert manifest["pattern"]["retrieval_heads"] == original["engine"].retrieval_heads
    assert manifest["files"] == ["b.txt"] and not manifest["partial"]
    assert len(manifest["data"]["blocks"]) == -(-book.bytes // (256 << 10)) > 8
    assert (original["lib"] / book.id / "cache.bin").stat().st_size == book.bytes


def damage_truncate(path):
    data = path / "cache.bin"
    data.write_bytes(data.read_bytes()[:-1000])


def damage_flip_last_block(path):
    data = path / "cache.bin"
    raw = bytearray(data.read_bytes())
    raw[-10] ^= 0x01  # in the last block: a one-pass load would have overwritten the cache before finding it
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, message",
    [(damage_truncate, "truncated"), (damage_flip_last_block, r"block \d+ .* fails its checksum")],
)
def test_damaged_book_is_refused_and_the_loaded_document_still_answers(
    original, loaded, tmp_path, damage, message
):
    copy = shutil.copytree(original["lib"] / original["book"].id, tmp_path / "book")
    damage(copy)
    document = loaded.document
    with pytest.raises(library.BookCorrupt, match=message):
        library.load(loaded, copy)
    assert loaded.document is document
    assert_same_state(valid_state(loaded), original["state"])
    if damage is damage_flip_last_block:
        assert answer(loaded) == original["answer"]


def edit_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _other_sparsity(m):
    m["pattern"]["sparsity"] = 0.25
    m["pattern"]["retrieval_heads"] = [h + 1 for h in m["pattern"]["retrieval_heads"]]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["settings"].update(kv_bits=8), "saved with kv_bits=8, this engine uses kv_bits=4"),
        (lambda m: m["settings"].update(w8a8=True), "saved with w8a8=True, this engine uses w8a8=False"),
        (_other_sparsity, "saved with 25.0% streaming heads, this engine uses 50.0%"),
        (lambda m: m["pattern"].update(gates_sha256="0" * 64), "saved with attention pattern"),
        (
            lambda m: m["model"].update(name="Llama-3-8B"),
            "saved with model Llama-3-8B, this engine runs SmolLM2",
        ),
        (lambda m: m["model"].update(weights_sha256="0" * 64), "saved with other weights of model SmolLM2"),
        (lambda m: m.update(format_version=99), "written in book format 99"),
    ],
)
def test_book_from_another_model_or_setting_is_refused(original, loaded, tmp_path, edit, message):
    copy = shutil.copytree(original["lib"] / original["book"].id, tmp_path / "book")
    edit_manifest(copy, edit)
    with pytest.raises(library.BookMismatch, match=message):
        library.load(loaded, copy)
    assert_same_state(valid_state(loaded), original["state"])


def test_engine_with_other_settings_refuses_the_book_and_finds_none(pattern_dir, original):
    other = make_engine(pattern_dir, kv_bits=8, sparsity=0.25)
    with pytest.raises(library.BookMismatch) as e:
        library.load(other, original["book"].id, original["lib"])
    assert "saved with kv_bits=4, this engine uses kv_bits=8" in str(e.value)
    assert "saved with 50.0% streaming heads, this engine uses 24.4%" in str(e.value)  # 22 of 90 heads
    assert other.document is None and other.cache.seq_len == 0
    sha = original["book"].token_sha256
    assert library.find_by_hash(sha, original["lib"], engine=other) == []
    assert library.find_by_hash(sha, original["lib"], engine=original["engine"]) == [original["book"]]
    with pytest.raises(library.LibraryError, match="no document is loaded"):
        library.save(other, original["lib"])


def test_reloading_over_a_loaded_document_verifies_first_and_gives_the_same_state(original, loaded):
    seen = []
    library.load(loaded, original["book"], on_progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (2 * original["book"].bytes,) * 2  # a verify pass, then the copy
    assert_same_state(valid_state(loaded), original["state"])


class Crash(RuntimeError):
    pass


def test_stopped_prefill_resumes_to_the_same_cache_bytes(pattern_dir, original, tmp_path):
    engine, doc_ids = make_engine(pattern_dir), original["ids"]
    ckpt = tmp_path / "checkpoint"

    def stop_after(chunks: int, how):
        calls = []

        def progress(done, total):
            calls.append(done)
            if len(calls) == chunks:
                how()

        return progress

    # 1. cancelled after 2 chunks: the checkpoint (every_chunks=2) is written before the cancel is seen
    with pytest.raises(Cancelled):
        library.ingest_resumable(
            engine, doc_ids, ckpt, every_chunks=2, on_progress=stop_after(2, engine.cancel)
        )
    assert json.loads((ckpt / "manifest.json").read_text())["tokens"] == 2 * CHUNK

    # 2. "killed" (the cache is garbage, as in a new process) and resumed; crashes 2 chunks later
    for layer in engine.cache.layers:
        for t in layer.values():
            t.fill_(7)
    engine.reset()

    def crash():
        raise Crash("power cut")

    before = engine.prefilled_tokens
    with pytest.raises(Crash):
        library.ingest_resumable(engine, doc_ids, ckpt, every_chunks=2, on_progress=stop_after(2, crash))
    assert engine.prefilled_tokens - before == 2 * CHUNK  # started at the checkpoint, not at 0
    assert json.loads((ckpt / "manifest.json").read_text())["tokens"] == 4 * CHUNK
    shutil.copytree(ckpt, tmp_path / "kept")

    # 3. resumed to the end: the same bytes as the uninterrupted pre-fill, and the checkpoint is gone
    before = engine.prefilled_tokens
    info = library.ingest_resumable(engine, doc_ids, ckpt, every_chunks=2, title="Paul Graham essays")
    assert engine.prefilled_tokens - before == len(doc_ids) - 4 * CHUNK
    assert info.sha256 == original["engine"].document.sha256
    assert_same_state(valid_state(engine), original["state"])
    assert not ckpt.exists()

    # 4. a checkpoint whose ids are not a prefix of the new ids is not used
    other = doc_ids[: CHUNK + 10]
    other[5] += 1
    before = engine.prefilled_tokens
    library.ingest_resumable(engine, other, tmp_path / "kept", every_chunks=2)
    assert engine.prefilled_tokens - before == len(other)


def test_list_find_and_remove(original, tmp_path):
    lib = shutil.copytree(original["lib"], tmp_path / "lib")
    books = library.list_books(lib)
    assert [b.id for b in books] == [original["book"].id]
    book = books[0]
    assert (book.title, book.model) == ("Paul Graham essays", "SmolLM2-135M-Instruct")
    assert book.tokens == original["engine"].document.tokens and "KV4, 50% streaming heads" in book.settings
    assert library.find_by_hash(book.token_sha256, lib)[0].id == book.id
    assert library.find_by_hash("0" * 64, lib) == []
    library.remove(book.id, lib)
    assert library.list_books(lib) == []
    with pytest.raises(library.LibraryError, match="no book"):
        library.remove(book.id, lib)
    with pytest.raises(library.LibraryError, match="no book"):
        library.remove("../lib", lib)


def test_cli_lists_and_removes(original, tmp_path, capsys, monkeypatch):
    lib = shutil.copytree(original["lib"], tmp_path / "lib")
    monkeypatch.setenv("DUO_QSERVE_LIBRARY", str(lib))
    assert cli(["library", "list"]) == 0
    assert original["book"].id in capsys.readouterr().out
    assert cli(["library", "rm", original["book"].id]) == 0
    assert cli(["library", "rm", original["book"].id]) == 2
    assert "no book" in capsys.readouterr().err


def test_an_engine_from_a_books_settings_loads_it(original):
    settings = library.book_settings(original["book"].id, original["lib"])
    made = original["engine"].settings
    assert (settings.sparsity, settings.kv_bits, settings.key_group) == (
        made.sparsity,
        made.kv_bits,
        made.key_group,
    )
    engine = Engine.from_settings(settings)
    library.load(engine, original["book"].id, original["lib"])
    assert answer(engine) == original["answer"]


def test_cli_progress_is_one_line_per_tenth_in_a_log_and_redrawn_in_place_on_a_terminal(capsys, monkeypatch):
    """A log file or pipe gets newline-ended progress lines (a carriage return would make them one run-on line);
    a terminal gets one line redrawn in place, ended once the work is done."""
    show = print_progress("pre-fill")
    for done in range(0, 1001, 50):
        show(done, 1000)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "pre-fill 0/1,000 tokens" and lines[-1] == "pre-fill 1,000/1,000 tokens"
    assert len(lines) == 11 and not any("\r" in line for line in lines)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    show = print_progress("load", "GB")
    show(5e8, 1e9), show(1e9, 1e9)
    assert capsys.readouterr().err == "\rload 0.50/1.00 GB\rload 1.00/1.00 GB\n"
