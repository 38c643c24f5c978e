"""The app on several ranks (``app.ranks``). What rank 0 announces, checked without other ranks; then the app on
two gloo ranks: rank 0's server makes the engine calls the UI's events make (build the engine and warm it up,
pre-fill a book into a session, a conversation with a stream closed early, a refused save, the session's end, an
engine replaced by new settings), and rank 1 follows. Every answer must be the one the same calls give in one
process, and the library must be refused with its message."""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
from pathlib import Path

import pytest
from conftest import HAYSTACK, haystack_text, on_ranks, tiny_args, tiny_model

from app.main import Server
from app.ranks import CacheRef, LeaderEngine, follow, stop
from duo_qserve.conversation import Conversation
from duo_qserve.distributed import ContextGroup
from duo_qserve.engine import Engine, EngineSettings
from duo_qserve.library import LibraryError
from duo_qserve.loading import LoadedModel

SETTINGS = EngineSettings(max_tokens=2048, chunk_size=256, device="cpu", w8a8=False)
KEY = "session:test"
TOKENS = 12


class Orders:
    """A stand-in for the group on rank 0 that keeps what would be broadcast."""

    rank, is_leader = 0, True

    def __init__(self):
        self.sent = []

    def share(self, message):
        self.sent.append(message)


def test_orders_name_caches_by_id_drop_callbacks_and_free_what_rank_0_freed():
    engine = Engine(LoadedModel(tiny_model(tiny_args()), None, "tiny", "tiny"),
                    EngineSettings(pattern=None, max_tokens=2048, chunk_size=64, sink=8, recent=32, w8a8=False))  # fmt: skip
    orders = Orders()
    leader = LeaderEngine(engine, orders)
    with pytest.raises(RuntimeError, match="not made through new_cache"):
        leader.use(engine.cache, None)  # the engine's own first cache: no other rank could find it
    first = leader.new_cache(100)
    leader.use(first, None)
    leader.ingest([1, 2, 3], on_progress=lambda done, total: None)
    del first
    leader.use(leader.new_cache(0), None)  # the first cache is now nobody's
    gc.collect()
    leader.reset()
    ops = [(o.op, o.args, o.kwargs, o.cache_id, o.freed) for o in orders.sent]
    assert ops == [
        ("new_cache", (100,), {}, 0, ()),
        ("use", (CacheRef(0), None), {}, None, ()),
        ("ingest", ([1, 2, 3],), {"on_progress": None}, None, ()),
        ("new_cache", (0,), {}, 1, ()),
        ("use", (CacheRef(1), None), {}, None, ()),
        ("reset", (), {}, None, (0,)),
    ]
    assert leader.capacity is engine.capacity  # what the UI reads is rank 0's own


def app_session(server: Server, text: str) -> dict:
    """The engine calls of: load a book, three questions in one conversation (the second's stream closed after
    its first piece, as a Stop or a closed tab does), Save, the session ending, new settings, a book again."""
    with server.engine.lock:  # the warm-up job holds it until done
        pass
    engine = server.engine
    info = server.store.prefill(KEY, engine.document_ids(text), "essay", "test")
    conversation = Conversation()
    answers = [engine.answer("What is this text about?", max_new_tokens=TOKENS, conversation=conversation)]
    pieces = engine.ask("Who is the author?", max_new_tokens=TOKENS, conversation=conversation)
    answers.append(next(pieces))
    pieces.close()
    answers.append(engine.answer("Name one idea in it.", max_new_tokens=TOKENS, conversation=conversation))
    try:
        server.store.save(KEY, info.sha256)
        refused = ""
    except LibraryError as e:
        refused = str(e)
    # the Load book button with no saved book picked (none is listed under torchrun): the status line says why
    load_refused = next(server.load_book(None, info.sha256, None))[0]
    server.store.end(KEY)
    with server.engine.lock:
        server._replace_engine(dataclasses.replace(SETTINGS, sparsity=0.75))
    with server.engine.lock:
        pass
    server.store.prefill(KEY, server.engine.document_ids(text), "essay", "test")
    answers.append(server.engine.answer("What is this text about?", max_new_tokens=TOKENS))
    return {"answers": answers, "turns": [[t.answer, t.ids] for t in conversation.turns], "refused": refused,
            "load_refused": load_refused}  # fmt: skip


def _ranks(group: ContextGroup, work: str) -> None:
    if not group.is_leader:
        follow(group)
        return
    try:
        server = Server(SETTINGS, evidence=False, make_engine=functools.partial(LeaderEngine.build, group))
        result = app_session(server, (Path(work) / "essay.txt").read_text())
    finally:
        stop(group)
    (Path(work) / "rank0.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_the_app_on_two_ranks_answers_as_in_one_process(tmp_path, monkeypatch):
    if not HAYSTACK.is_dir():
        pytest.skip(f"shared haystack not found at {HAYSTACK}")
    monkeypatch.setenv("DUO_QSERVE_LIBRARY", str(tmp_path / "library"))
    text = haystack_text(2500)
    (tmp_path / "essay.txt").write_text(text)
    on_ranks(2, _ranks, str(tmp_path))
    two = json.loads((tmp_path / "rank0.json").read_text())
    one = app_session(Server(SETTINGS, evidence=False, make_engine=Engine.from_settings), text)
    assert all(one["answers"]) and one["refused"] == ""  # one process saves the book
    assert two["answers"] == one["answers"] and two["turns"] == one["turns"]
    assert "not available with context parallelism" in two["refused"]
    assert one["load_refused"] == "**Not loaded:** pick a saved book first."
    assert two["load_refused"].startswith(
        "**Not loaded:** Loading a book is not available with context parallelism"
    )


def _rank_0_leaves(group: ContextGroup, work: str) -> None:
    """Rank 0 ends without telling the followers to stop (killed, say); rank 1 keeps what ``follow`` raised."""
    if group.is_leader:
        return
    try:
        follow(group)
    except SystemExit as e:
        (Path(work) / "rank1.txt").write_text(str(e.code))


def test_a_follower_whose_rank_0_is_gone_stops_with_one_line(tmp_path):
    on_ranks(2, _rank_0_leaves, str(tmp_path))
    message = (tmp_path / "rank1.txt").read_text()
    assert message == "rank 1: stopped: rank 0 ended or failed (its connection closed)"
