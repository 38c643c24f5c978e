"""The Gradio app end to end through its API: upload, pre-fill, ask, stop, bad files, export.

One app (the default model on the CPU, a small cache) serves the whole module; the document is ~360 tokens so
pre-fill takes seconds.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import gradio as gr
import httpx
import numpy as np
import pytest
from conftest import haystack_text
from gradio_client import Client, handle_file

from app.main import Server, build_app, parse_args
from duo_qserve.engine import EngineSettings
from duo_qserve.patterns import save_pattern

pytestmark = pytest.mark.slow

SECRET = "48213"
ADMIN = "operator-token"
QUESTION = "According to the document, what is the secret number?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needle_text() -> str:
    text = haystack_text(1400)
    return text[:700] + f" The secret number is {SECRET}. " + text[700:]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("DUO_QSERVE_LIBRARY", str(tmp_path_factory.mktemp("library")))
    server = Server(EngineSettings(device="cpu", max_tokens=2048, chunk_size=128), admin_token=ADMIN)
    demo = build_app(server)
    port = free_port()
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    patch.undo()


@pytest.fixture(scope="module")
def loaded(app_url, tmp_path_factory):
    """A client session that has read and pre-filled the needle document."""
    book = tmp_path_factory.mktemp("books") / "needle.txt"
    book.write_text(needle_text())
    client = Client(app_url, verbose=False)
    summary, _chapters = client.predict([handle_file(str(book))], "", api_name="/read")
    assert "Fits" in summary and "needle.txt" in summary
    job = client.submit(api_name="/prefill")
    progress, status = job.result(timeout=120)
    assert "Loaded **needle**" in status, status
    assert any("tokens/s" in out[0] for out in job.outputs()[:-1]), "no progress was streamed"
    return client


def answer_text(history: list[dict]) -> str:
    content = history[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def ask(client: Client, question: str = QUESTION, max_new_tokens: int = 32):
    job = client.submit(question, [], 0.0, 1.0, max_new_tokens, 1.1, 0, 24, api_name="/ask")
    history, _question, stats = job.result(timeout=120)
    return job, answer_text(history), stats


def test_answer_streams_and_finds_the_planted_number(loaded):
    job, answer, stats = ask(loaded)
    assert SECRET in answer
    partial = [answer_text(out[0]) for out in job.outputs()[:-1]]
    assert len(set(partial)) > 2, "the answer arrived in one piece instead of streaming"
    assert "s to first token" in stats and "ms/token" in stats


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [("binary.txt", bytes(range(256)) * 8, "binary"), ("empty.txt", b"", "no text")],
)
def test_bad_file_is_refused_and_the_loaded_document_still_answers(loaded, tmp_path, name, data, expected):
    bad = tmp_path / name
    bad.write_bytes(data)
    summary, _chapters = loaded.predict([handle_file(str(bad))], "", api_name="/read")
    assert summary.startswith("**Not read:**") and expected in summary and "still holds **needle**" in summary
    _job, answer, _stats = ask(loaded)
    assert SECRET in answer


def test_stop_ends_a_running_answer(loaded):
    job = loaded.submit("Retell the whole document in detail.", [], 0.0, 1.0, 400, 1.0, 0, 0, api_name="/ask")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 3 and time.monotonic() < deadline:  # a few tokens have streamed
        time.sleep(0.1)
    stopped_at = time.monotonic()
    loaded.predict(api_name="/stop")
    while not job.done() and time.monotonic() < stopped_at + 10:
        time.sleep(0.1)
    assert job.done(), "the answer kept going after Stop"
    history, _question, stats = job.outputs()[-1]
    assert "stopped after" in stats and "ready" in stats and answer_text(history)  # what was generated stays
    # the engine is free again: the next question runs at once
    _job, answer, _stats = ask(loaded)
    assert SECRET in answer
    turns = json.loads(open(loaded.predict("JSON", api_name="/export")).read())["turns"]
    assert turns[-2]["ended_by"] == "cancel" and turns[-2]["answer_tokens"] < 400
    assert len(turns) >= 2  # every turn of the conversation is exported


def test_a_follow_up_follows_the_earlier_turns_and_new_conversation_clears_them(loaded):
    _job, _answer, stats = ask(loaded)
    assert re.search(r"turn \d+ of this conversation \(\d+ earlier in context", stats), stats
    loaded.predict(api_name="/clear")
    _job, _answer, stats = ask(loaded)
    assert "turn 1 of this conversation (0 earlier" in stats
    loaded.predict(api_name="/clear")
    assert loaded.predict("JSON", api_name="/export") == {"__type__": "update"}  # a notice, no file
    _job, answer, _stats = ask(loaded)  # the export test below reads this one
    assert SECRET in answer


def test_export_json_carries_provenance(loaded):
    path = loaded.predict("JSON", api_name="/export")
    data = json.loads(open(path).read())
    turn = data["turns"][0]
    assert turn["question"] == QUESTION and SECRET in turn["answer"]
    meta = turn["provenance"]
    assert meta["model"] == "SmolLM2-135M-Instruct" and meta["kv_bits"] == 4 and "w8a8" in meta
    assert meta["document"]["title"] == "needle" and len(meta["document"]["token_sha256"]) == 64
    markdown = open(loaded.predict("Markdown", api_name="/export")).read()
    assert "# Questions about needle" in markdown and "token sha256" in markdown


def test_a_saved_book_loads_without_prefill_and_answers(loaded, tmp_path):
    """Load book also sets the document area: its status names the book loaded and the bar of an earlier pre-fill
    is cleared (they would otherwise still describe the previous document)."""
    status, _books = loaded.predict(api_name="/save_book")
    book_id = re.search(r"as `([^`]+)`", status).group(1)
    book = tmp_path / "needle.txt"
    book.write_text(needle_text())
    summary, _chapters = loaded.predict([handle_file(str(book))], "", api_name="/read")
    assert "A saved copy is in the **Library**" in summary
    status, doc_status, progress = loaded.predict(book_id, api_name="/load_book")
    assert status.startswith("Loaded **needle** from the library"), status
    assert doc_status.startswith("Loaded **needle** from the library") and "no pre-fill" in doc_status
    assert progress == ""
    _job, answer, _stats = ask(loaded)
    assert SECRET in answer


def test_settings_are_for_the_operator_only(loaded):
    for token in ("", "operator-toke", None):
        status, _headline = loaded.predict("default", "none", 0.5, "4", False, token, api_name="/apply")
        assert status.startswith("**Not applied:**") and "for the operator" in status, status
    _job, answer, _stats = ask(loaded)
    assert SECRET in answer


def test_bad_settings_keep_the_running_engine(loaded, tmp_path):
    status, _headline = loaded.predict(
        "default", str(tmp_path / "missing"), 0.5, "4", False, ADMIN, api_name="/apply"
    )
    assert status.startswith("**Error:**") and "no attention pattern" in status
    _job, answer, _stats = ask(loaded)
    assert SECRET in answer


def test_too_large_document_offers_the_ratio_that_fits(app_url, tmp_path):
    """Last: it reloads the model, which drops the loaded document."""
    client = Client(app_url, verbose=False)
    pattern = save_pattern(
        tmp_path / "pattern", np.random.default_rng(0).random((30, 3)), {"sink_size": 32, "recent_size": 64}
    )
    status, headline = client.predict("default", str(pattern), 0.0, "4", False, ADMIN, api_name="/apply")
    assert status.startswith("Loaded") and "0% streaming heads" in headline
    summary, _chapters = client.predict([], haystack_text(6000), api_name="/read")
    match = re.search(r"would fit at \*\*(\d+)% streaming heads", summary)
    assert "Too large" in summary and match, summary
    _status, headline, summary, ratio = client.predict(ADMIN, api_name="/apply_ratio")
    assert "Fits" in summary and ratio == pytest.approx(int(match.group(1)) / 100)
    assert f"{match.group(1)}% streaming heads" in headline


def test_without_an_admin_token_a_too_large_document_says_what_the_user_can_do_not_press_reload(tmp_path):
    """Nobody can reload a server started without --admin-token: the summary names the ratio that would fit but
    offers no button and no "press the button"; Reload, called anyway, says why in the document's status line
    (no error raised) and keeps the engine."""
    pattern = save_pattern(
        tmp_path / "pattern", np.random.default_rng(0).random((30, 3)), {"sink_size": 32, "recent_size": 64}
    )
    server = Server(
        EngineSettings(device="cpu", max_tokens=2048, chunk_size=128, pattern=str(pattern), sparsity=0.0)
    )
    engine, request = server.engine, gr.Request(session_hash="reader")
    summary, _, pending, ratio_button, load = server.read(None, haystack_text(6000), None, request)
    assert "Too large" in summary and "would fit at" in summary, summary
    assert (
        "press the button" not in summary
        and "shorten the document" in summary
        and "ask the operator" in summary
    )
    assert ratio_button["visible"] is False and load["interactive"] is False
    outputs = list(server.apply_ratio(pending, "", request))
    assert (
        len(outputs) == 1
        and outputs[0][0].startswith("**Not reloaded:**")
        and "without an admin token" in outputs[0][0]
    )
    assert server.engine is engine


def test_saved_books_say_they_last_only_while_the_tab_is_open_without_a_login(tmp_path, monkeypatch):
    """An anonymous session's library is deleted when the session ends (a reload): Save says so, as the library
    panel does (``library_lifetime``); a login's books stay, and its Save says that instead."""
    monkeypatch.setenv("DUO_QSERVE_LIBRARY", str(tmp_path / "library"))
    server = Server(EngineSettings(device="cpu", max_tokens=2048, chunk_size=128))
    for request in (
        gr.Request(session_hash="anonymous"),
        gr.Request(username="alice", session_hash="alice-tab"),
    ):
        _summary, _chapters, pending, *_ = server.read(None, haystack_text(1000), None, request)
        *_, (_bar, _status, mine) = server.prefill(pending, None, request)
        *_, (saved, _books) = server.save_book(mine, request)
        assert saved.startswith("Saved **") and server.library_lifetime(request) in saved, saved
    anonymous, login = (
        server.library_lifetime(r) for r in (gr.Request(session_hash="x"), gr.Request(username="a"))
    )
    assert "only while this tab is open" in anonymous and "--auth" in anonymous
    assert "next sign-in" in login and "tab" not in login


def test_text_longer_than_any_setting_is_refused_before_tokenizing(tmp_path, monkeypatch):
    """Reading stops at the characters no streaming-head ratio could hold; the tokenizer never sees the text."""
    import app.main as app_main

    server = Server(EngineSettings(device="cpu", max_tokens=2048, chunk_size=128))
    tokens = max(server.engine.max_document_tokens, server.engine.document_tokens_at(1.0))
    monkeypatch.setattr(app_main, "CHARS_PER_TOKEN_BOUND", 10_000 / tokens)  # a 10K-character limit
    limit = server._max_chars()
    assert 9_000 <= limit <= 10_000
    book = tmp_path / "long.txt"
    book.write_text("word " * (limit // 5 + 100))
    monkeypatch.setattr(server.engine, "document_ids", lambda text: pytest.fail("the text was tokenized"))
    summary, *_ = server.read([str(book)], "", None, gr.Request(session_hash="reader"))
    assert summary.startswith("**Not read:**") and f"{limit:,} characters" in summary


def test_the_time_left_clock_takes_its_prior_from_the_warm_up_then_from_each_prefill(tmp_path, monkeypatch):
    """On the CPU the warm-up times a chunk at the clock's probe prefixes (``Engine.chunk_seconds``): the first
    pre-fill's clock starts from that curve, and each finished pre-fill's fit is the next one's prior."""
    monkeypatch.setenv("DUO_QSERVE_LIBRARY", str(tmp_path / "library"))
    server = Server(EngineSettings(device="cpu", max_tokens=2048, chunk_size=128))
    deadline = time.monotonic() + 120
    while not server.warm_status.startswith("Warm-up done") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.warm_status.startswith("Warm-up done"), server.warm_status
    warm = server.prefill_prior
    assert warm is not None and warm[0] > 0 and min(warm) >= 0
    request = gr.Request(session_hash="clock")
    _summary, _chapters, pending, *_ = server.read(None, haystack_text(3000), None, request)
    outputs = list(server.prefill(pending, None, request))
    assert "Loaded" in outputs[-1][1], outputs[-1][1]
    assert server.prefill_prior is not None and server.prefill_prior != warm and server.prefill_prior[0] > 0


def test_reading_the_same_uploads_again_is_refused_and_withdraws_the_earlier_reading(tmp_path):
    """Uploads are deleted once read, but the upload box still lists them: a second Read (or a file added beside
    them) says so, and leaves nothing for Load, so the earlier reading is never loaded in the new one's place."""
    server = Server(EngineSettings(device="cpu", max_tokens=2048, chunk_size=128))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()  # an upload's own folder, as Gradio makes one
    book, other = tmp_path / "a" / "book.txt", tmp_path / "b" / "other.txt"
    book.write_text(haystack_text(300))
    other.write_text(haystack_text(200))
    request = gr.Request(session_hash="reader")
    _, _, pending, *_ = server.read([str(book)], "", None, request)
    assert pending is not None and not book.exists()
    summary, _, pending, _, load = server.read([str(book), str(other)], "", None, request)
    assert summary.startswith("**Not read:**") and "book.txt: already read" in summary
    assert pending is None and load["interactive"] is False
    # the refused batch deleted nothing it did not read: the other file reads once book.txt is removed
    assert "other.txt" not in summary and other.exists()
    summary, _, pending, *_ = server.read([str(other)], "", None, request)
    assert "Fits" in summary and pending is not None and not other.exists()


def test_an_upload_not_yet_on_disk_is_said_to_be_uploading_not_already_read(tmp_path):
    """A file this session never read that is not on disk (its upload still being written) is not called
    "already read", and a file refused for any reason stays in place to be read later."""
    server = Server(EngineSettings(device="cpu", max_tokens=2048, chunk_size=128))
    (tmp_path / "a").mkdir()
    late, binary = tmp_path / "a" / "late.txt", tmp_path / "a" / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    request = gr.Request(session_hash="reader")
    summary, *_ = server.read([str(late)], "", None, request)
    assert "late.txt: not on the server: still uploading" in summary and "already read" not in summary
    summary, *_ = server.read([str(binary)], "", None, request)
    assert summary.startswith("**Not read:**") and binary.exists()


def test_the_upload_limits_help_gives_megabytes_and_the_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    assert "MB (MiB) one uploaded file may have (default: 256)" in shown
    assert "MB (MiB) one session may upload in all (default: 2048)" in shown and "bytes per file" not in shown


def test_an_upload_is_called_by_the_name_the_browser_sent_which_is_only_ever_a_name(tmp_path):
    """Gradio stores ``Les Misérables $1.txt`` as ``Les Misérables 1.txt`` (it strips ``$`` and other characters
    from stored names): Read shows the name the browser sent (``FileData.orig_name``), in the summary and in
    refusals. That name is only a name: a path in it is cut to its last part and unprintable characters go, and
    what is read is the stored path."""
    server = Server(EngineSettings(device="cpu", max_tokens=2048, chunk_size=128))
    request = gr.Request(session_hash="reader")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    stored = tmp_path / "a" / "Les Misérables 1.txt"
    stored.write_text(haystack_text(300))
    upload = {"path": str(stored), "orig_name": "Les Misérables $1.txt", "meta": {"_type": "gradio.FileData"}}
    summary, _, pending, *_ = server.read([upload], "", None, request)
    assert summary.startswith("**Les Misérables $1** (Les Misérables $1.txt):"), summary
    assert pending.document.title == "Les Misérables $1"
    summary, *_ = server.read([upload], "", None, request)  # read already, and deleted
    assert "Les Misérables $1.txt: already read" in summary, summary
    other = tmp_path / "b" / "other.txt"
    other.write_text(haystack_text(200))
    sneaky = {"path": str(other), "orig_name": "../../etc/pass\x00wd.txt"}
    summary, _, pending, *_ = server.read([sneaky], "", None, request)
    assert pending.document.files == ["passwd.txt"] and not other.exists()


def test_read_takes_no_file_from_outside_the_upload_folder(app_url, tmp_path):
    """Read gets the uploads' FileData unprocessed (for the names the browser sent), and Gradio still refuses a
    path it did not receive as an upload before the handler sees it: that file is neither read nor deleted, while
    the same request with an uploaded file reads it."""
    config = httpx.get(f"{app_url}config").json()
    read = next(d["id"] for d in config["dependencies"] if d["api_name"] == "read")

    def read_raw(path: str, session: str) -> dict:
        upload = {"path": path, "orig_name": "book.txt", "meta": {"_type": "gradio.FileData"}}
        joined = httpx.post(
            f"{app_url}gradio_api/queue/join",
            json={"data": [[upload], "", None], "fn_index": read, "session_hash": session},
        )
        assert joined.status_code == 200, joined.text
        with httpx.stream(
            "GET", f"{app_url}gradio_api/queue/data", params={"session_hash": session}
        ) as events:
            messages = [json.loads(line[5:]) for line in events.iter_lines() if line.startswith("data:")]
        return next(m for m in messages if m.get("msg") == "process_completed")

    text = f"The secret number is {SECRET}. " + haystack_text(300)
    uploaded = httpx.post(
        f"{app_url}gradio_api/upload", files=[("files", ("book.txt", text.encode()))]
    ).json()
    completed = read_raw(uploaded[0], "uploader")
    assert completed["success"] and "**book** (book.txt)" in completed["output"]["data"][0], completed
    outside = tmp_path / "secret.txt"
    outside.write_text(text)
    completed = read_raw(str(outside), "intruder")
    assert completed["success"] is False and SECRET not in json.dumps(completed) and outside.exists()


def _prefill_under_way(request: gr.Request) -> tuple[Server, threading.Thread, list]:
    """A CPU server pre-filling pasted text for ``request``'s session in a thread, returned once its first chunk
    is done (so the pre-fill is mid-way): the server, the thread and the list its outputs go to."""
    server = Server(EngineSettings(device="cpu", max_tokens=4096, chunk_size=128))
    _summary, _chapters, pending, *_ = server.read(None, haystack_text(8000), None, request)
    outputs: list = []
    prefill = threading.Thread(target=lambda: outputs.extend(server.prefill(pending, None, request)))
    prefill.start()
    deadline = time.monotonic() + 120
    while not (server.job and server.job.reading and server.job.reading[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, prefill, outputs


def test_a_question_asked_during_this_sessions_prefill_is_told_it_waits_for_it(tmp_path):
    """Ask during the session's own pre-fill queues behind it (and is answered once it ends): ``ask_waits`` says
    so at once, with the pre-fill's progress; for another session, an empty question, or once the pre-fill has
    ended, it says nothing."""
    reader, other = gr.Request(session_hash="reader"), gr.Request(session_hash="other")
    server, prefill, outputs = _prefill_under_way(reader)
    line = server.ask_waits("What is it about?", reader)
    match = re.fullmatch(
        r"\*\*Waiting:\*\* \*\*Pasted text\*\* is still being read \(([\d,]+) of ([\d,]+) tokens, \d+%\); "
        r"your question is answered as soon as it is loaded\.",
        line,
    )
    assert match and 0 < int(match[1].replace(",", "")) < int(match[2].replace(",", "")), line
    assert server.ask_waits("What is it about?", other) == gr.skip()
    assert server.ask_waits("  ", reader) == gr.skip()
    prefill.join()
    assert "Loaded" in outputs[-1][1] and server.ask_waits("What is it about?", reader) == gr.skip()


def test_stop_withdraws_a_question_waiting_behind_the_prefill_and_leaves_the_prefill_running():
    """Stop is for answers and Cancel for pre-fills: Stop pressed while this session's question waits behind its
    pre-fill withdraws the question (said at once; when its turn comes it is not asked and stays in its box) and
    the pre-fill runs on; Stop with nothing waiting, or from another session, does nothing; the next question is
    answered as usual."""
    from duo_qserve.conversation import Conversation

    reader, other = gr.Request(session_hash="reader"), gr.Request(session_hash="other")
    server, prefill, outputs = _prefill_under_way(reader)
    assert (
        server.stop(reader) == gr.skip() and not server.job.cancelled
    )  # nothing waits: the pre-fill goes on
    assert server.ask_waits("What is it about?", reader).startswith("**Waiting:**")
    assert server.stop(other) == gr.skip()
    assert (
        server.stop(reader) == "**Stopped:** your question will not be asked; the book is still being read."
    )
    prefill.join()
    assert "Loaded" in outputs[-1][1], outputs[-1]
    mine = outputs[-1][2]
    sampling = (0.0, 1.0, 8, 1.0, 0, 0)
    withdrawn = list(server.ask("What is it about?", [], Conversation(), mine, *sampling, reader))
    assert withdrawn == [
        (gr.skip(), gr.skip(), "**Not asked:** you pressed Stop while it waited; it is still in the box.")
    ]
    answered = list(server.ask("What is it about?", [], Conversation(), mine, *sampling, reader))
    history = [o[0] for o in answered if isinstance(o[0], list)][-1]
    assert answered[0][1] == "" and history[-1]["role"] == "assistant" and history[-1]["content"]
