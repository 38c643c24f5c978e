"""The app in a real browser (headless Debian Chromium via Playwright): upload, progress, answer, live memory.

Saves a screenshot of the finished page under the test's tmp directory (docs/screenshot.png is a copy of one).
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
from conftest import haystack_text

from app.main import Server, build_app
from duo_qserve.engine import EngineSettings

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SECRET = "48213"

if not CHROMIUM.is_file():
    pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="needs the playwright package (pip install playwright)"
)


@pytest.fixture(scope="module")
def app_url():
    server = Server(EngineSettings(device="cpu", max_tokens=2048, chunk_size=64))
    demo = build_app(server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.queue().launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_upload_prefill_ask_and_live_memory_in_a_browser(app_url, tmp_path):
    """The book's name keeps the characters Gradio strips from the stored upload's (``$``)."""
    book = tmp_path / "Les Misérables $1 needle.txt"
    text = haystack_text(1400)
    book.write_text(text[:700] + f" The secret number is {SECRET}. " + text[700:])
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1100})
        page.goto(app_url)
        sync_api.expect(page.locator("#capacity")).to_contain_text("This CPU session", timeout=30_000)

        page.locator("input[type=file]").first.set_input_files(str(book))
        page.get_by_role("button", name="Read", exact=True).click()
        sync_api.expect(page.locator("#summary")).to_contain_text("Fits", timeout=30_000)
        sync_api.expect(page.locator("#summary")).to_contain_text("Les Misérables $1 needle.txt")

        page.get_by_role("button", name="Load into model").click()
        progress = page.locator(".prefill-progress")
        sync_api.expect(progress).to_contain_text(re.compile(r"\d+ / \d+ tokens"), timeout=30_000)
        sync_api.expect(page.locator("#doc-status")).to_contain_text("Loaded", timeout=120_000)
        sync_api.expect(page.locator("#banner")).to_contain_text("Les Misérables $1 needle", timeout=10_000)

        page.get_by_label("Question").fill("According to the document, what is the secret number?")
        page.get_by_role("button", name="Ask", exact=True).click()
        sync_api.expect(page.locator("#chat")).to_contain_text(SECRET, timeout=120_000)
        sync_api.expect(page.locator("#answer-stats")).to_contain_text("ms/token", timeout=30_000)

        memory = page.locator("#memory")
        before = memory.inner_text()
        assert "Running on the CPU" in before and "Context held" in before
        time.sleep(2.5)
        assert memory.inner_text() != before, "the memory readout did not refresh"

        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        browser.close()


def _open(p, app_url: str):
    browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1440, "height": 1100})
    page.goto(app_url)
    sync_api.expect(page.locator("#capacity")).to_contain_text("This CPU session", timeout=30_000)
    return browser, page


def _read(page, path: Path) -> None:
    page.locator("input[type=file]").first.set_input_files(str(path))
    page.get_by_role("button", name="Read", exact=True).click()
    sync_api.expect(page.locator("#summary")).to_contain_text("Fits", timeout=30_000)


def _ask(page, question: str) -> None:
    page.get_by_label("Question").fill(question)
    page.get_by_role("button", name="Ask", exact=True).click()


def test_warm_up_conversation_and_evidence_in_a_browser(app_url, tmp_path):
    """The warm-up's message, a follow-up that follows the earlier turn, New conversation (and the chat's trash
    icon, which is the same), the passages."""
    book = tmp_path / "needle.txt"
    text = haystack_text(1400)
    book.write_text(text[:700] + f" The secret number is {SECRET}. " + text[700:])
    with sync_api.sync_playwright() as p:
        browser, page = _open(p, app_url)
        sync_api.expect(page.locator("#warm-up")).to_contain_text("Warm-up done", timeout=30_000)
        _read(page, book)
        page.get_by_role("button", name="Load into model").click()
        sync_api.expect(page.locator("#doc-status")).to_contain_text("Loaded", timeout=120_000)

        _ask(page, "According to the document, what is the secret number?")
        stats = page.locator("#answer-stats")
        sync_api.expect(stats).to_contain_text("turn 1 of this conversation", timeout=120_000)
        chat = page.locator("#chat")
        sync_api.expect(chat).to_contain_text("Where this came from", timeout=10_000)
        sync_api.expect(chat).to_contain_text(re.compile(r"tokens [\d,]+–[\d,]+ · \d+% focus"))
        sync_api.expect(stats).to_contain_text("sources found in")

        _ask(page, "Say that number again.")
        sync_api.expect(stats).to_contain_text(
            "turn 2 of this conversation (1 earlier in context", timeout=120_000
        )

        page.get_by_role("button", name="New conversation").click()
        sync_api.expect(chat).not_to_contain_text(SECRET, timeout=10_000)
        _ask(page, "What is the secret number?")
        sync_api.expect(stats).to_contain_text("turn 1 of this conversation (0 earlier", timeout=120_000)

        # the chat's own trash icon starts a new conversation too, not only an empty screen
        sync_api.expect(chat).to_contain_text(SECRET, timeout=10_000)
        chat.get_by_role("button", name=re.compile("clear", re.IGNORECASE)).click()
        sync_api.expect(stats).to_be_empty(timeout=10_000)
        _ask(page, "What is the secret number?")
        sync_api.expect(stats).to_contain_text("turn 1 of this conversation (0 earlier", timeout=120_000)
        browser.close()


def test_stop_cancel_and_time_left_in_a_browser(app_url, tmp_path):
    """Cancel during the pre-fill says so without an error badge; the time left shows; a question asked during
    the pre-fill is told at once that it waits for it, and is answered once it ends; Stop keeps the answer and
    returns the UI to ready."""
    book = tmp_path / "long.txt"
    book.write_text(haystack_text(3800, start_file=2))  # ~900 tokens: 15 chunks of 64
    with sync_api.sync_playwright() as p:
        browser, page = _open(p, app_url)
        _read(page, book)
        page.get_by_role("button", name="Load into model").click()
        progress = page.locator(".prefill-progress")
        sync_api.expect(progress).to_contain_text(
            re.compile(r"\d[\d.]* ?\w* left"), timeout=60_000
        )  # the ETA
        page.get_by_role("button", name="Cancel").click()
        status = page.locator("#doc-status")
        sync_api.expect(status).to_contain_text(
            re.compile(r"Cancelled.* after [\d,]+ of [\d,]+ tokens"), timeout=60_000
        )
        assert page.get_by_text("Error", exact=True).count() == 0

        page.get_by_role("button", name="Load into model").click()
        sync_api.expect(progress).to_contain_text(
            re.compile(r"[1-9][\d,]* / [\d,]+ tokens · [\d,]+ tokens/s")
        )
        _ask(page, "Write a long, detailed summary of the whole document.")
        sync_api.expect(page.locator("#answer-stats")).to_contain_text(
            re.compile(r"Waiting: long is still being read \([\d,]+ of [\d,]+ tokens"), timeout=10_000
        )
        # the queued question shows its place in the queue on the chat alone: the line and the question stay clear
        assert _on_top(page.locator("#answer-stats p").first) and _on_top(page.get_by_label("Question"))
        sync_api.expect(status).to_contain_text("Loaded", timeout=180_000)
        chat = page.locator("#chat")
        # the answer's first words, not the question's
        answer_started = re.compile(r"whole document\.\s+(?!\(no answer\))\w+\W+\w+")
        sync_api.expect(chat).to_contain_text(answer_started, timeout=120_000)
        page.get_by_role("button", name="Stop").click()
        stats = page.locator("#answer-stats")
        sync_api.expect(stats).to_contain_text(
            re.compile(r"stopped after \d+ of at most \d+ tokens; ready"), timeout=60_000
        )
        assert answer_started.search(chat.inner_text())  # the text generated so far stays
        assert page.get_by_text("Error", exact=True).count() == 0
        browser.close()


def _on_top(element) -> bool:
    """Whether the middle of ``element`` shows it, not a progress overlay (or anything else) drawn over it."""
    element.scroll_into_view_if_needed()
    return element.evaluate(
        """e => {
            const r = e.getBoundingClientRect();
            const top = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
            return e.contains(top);
        }"""
    )


def _notices(page) -> list[str]:
    """Every error notice on the page: toasts, and the "Error" badges Gradio puts on an event's outputs."""
    toasts = [t.inner_text() for t in page.locator(".toast-body").all()]
    return toasts + ["badge"] * page.get_by_text("Error", exact=True).count()


def test_each_error_is_said_once_in_a_browser(app_url, tmp_path):
    """Asking with no document, or reading a file that is not what it claims, says why once, in the area's own
    line: no toast beside it and no error badge on the chat; the question typed stays in its box."""
    fake = tmp_path / "book.pdf"
    fake.write_bytes(b"%PDF-1.4 not a pdf at all")
    with sync_api.sync_playwright() as p:
        browser, page = _open(p, app_url)
        _ask(page, "What is the secret number?")
        sync_api.expect(page.locator("#answer-stats")).to_contain_text(
            "Not asked: No document is loaded", timeout=30_000
        )
        page.wait_for_timeout(1500)  # a toast or badge would be up by now
        assert _notices(page) == [], _notices(page)
        assert page.get_by_label("Question").input_value() == "What is the secret number?"

        page.locator("input[type=file]").first.set_input_files(str(fake))
        page.get_by_role("button", name="Read", exact=True).click()
        sync_api.expect(page.locator("#summary")).to_contain_text("Not read:", timeout=30_000)
        page.wait_for_timeout(1500)
        assert _notices(page) == [], _notices(page)
        browser.close()
