"""Many users on one app: each gradio_client session loads its own book and gets answers about it only; a session
that loaded nothing learns nothing; uploads are limited per file and per session and deleted once read."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import gradio as gr
import pytest
from conftest import haystack_text
from gradio_client import Client, handle_file

from app.main import Server, build_app
from app.sessions import UploadLimits
from duo_qserve.engine import EngineSettings

pytestmark = pytest.mark.slow

SECRETS = ["48213", "90517", "36472", "75190", "21864"]
QUESTION = "According to the document, what is the secret number?"


def planted(i: int) -> str:
    text = haystack_text(900, start_file=i)
    return text[:450] + f" The secret number is {SECRETS[i]}. " + text[450:]


def answer_text(history: list[dict]) -> str:
    content = history[-1]["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    patch = pytest.MonkeyPatch()
    patch.setenv("DUO_QSERVE_LIBRARY", str(tmp_path_factory.mktemp("library")))
    # a budget of about three of these books: five sessions make the least recently used go to the library
    server = Server(EngineSettings(device="cpu", max_tokens=4096, chunk_size=256))
    demo = build_app(server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield f"http://127.0.0.1:{port}/", server
    demo.close()
    patch.undo()


def test_five_sessions_each_get_answers_about_their_own_book_only(app_url, tmp_path):
    url, server = app_url

    def user(i: int) -> tuple[str, str, Client]:
        book = tmp_path / f"book-{i}.txt"
        book.write_text(planted(i))
        client = Client(url, verbose=False)
        summary, _chapters = client.predict([handle_file(str(book))], "", api_name="/read")
        assert "Fits" in summary, summary
        _progress, status = client.predict(api_name="/prefill")
        assert f"Loaded **book-{i}**" in status, status
        first = answer_text(client.predict(QUESTION, [], 0.0, 1.0, 24, api_name="/ask")[0])
        # asked again after the others loaded theirs: the book may have gone to the library and come back
        history, _question, stats = client.predict(QUESTION, [], 0.0, 1.0, 24, api_name="/ask")
        return first + " " + answer_text(history), stats, client

    with ThreadPoolExecutor(5) as pool:
        results = list(pool.map(user, range(5)))
    # each asks once more, in order: five books in a budget of about three, so the first books asked about now
    # were evicted to their owner's library and load back
    for i, (answers, stats, client) in enumerate(results):
        history, _question, again = client.predict(QUESTION, [], 0.0, 1.0, 24, api_name="/ask")
        results[i] = (answers + " " + answer_text(history), stats + " " + again, client)
    for i, (answers, stats, _client) in enumerate(results):
        assert SECRETS[i] in answers, (i, answers)
        others = [s for j, s in enumerate(SECRETS) if j != i]
        assert not any(s in answers or s in stats for s in others), (i, answers, stats)
        assert not any(f"book-{j}" in stats for j in range(5) if j != i), stats

    books = server.store.residency()
    assert books.evictions >= 2 and books.reloads >= 1, books
    assert books.resident + books.in_libraries == 5 and books.resident_bytes <= books.budget_bytes
    stranger = Client(url, verbose=False)
    _history, _question, message = stranger.predict(QUESTION, [], 0.0, 1.0, 24, api_name="/ask")
    assert message.startswith("**Not asked:** No document is loaded in this session"), message
    assert not any(s in message for s in SECRETS) and "book-" not in message
    assert stranger.predict(api_name="/books")["choices"] == []  # nobody else's saved or evicted books


def test_uploads_are_limited_per_file_and_per_session_and_deleted_once_read(tmp_path):
    server = Server(
        EngineSettings(device="cpu", max_tokens=2048, chunk_size=256),
        uploads=UploadLimits(per_upload_bytes=3000, per_session_bytes=5000),
    )

    def read(name: str, size: int, session: str) -> str:
        path = tmp_path / session / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(haystack_text(size)[:size])
        summary, *_ = server.read([str(path)], "", None, gr.Request(session_hash=session))
        read = "Fits" in summary
        assert path.exists() != read, "an upload read was kept, or one refused was deleted"
        return summary

    assert "at most 3,000" in read("big.txt", 3500, "a")
    assert "Fits" in read("one.txt", 2500, "a")
    assert "over its limit of 5,000" in read("two.txt", 2800, "a")
    assert "Fits" in read("two.txt", 2800, "b")  # another session has its own allowance
