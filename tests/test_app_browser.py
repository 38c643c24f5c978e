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
    book = tmp_path / "needle.txt"
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

        page.get_by_role("button", name="Load into model").click()
        progress = page.locator(".prefill-progress")
        sync_api.expect(progress).to_contain_text(re.compile(r"\d+ / \d+ tokens"), timeout=30_000)
        sync_api.expect(page.locator("#doc-status")).to_contain_text("Loaded", timeout=120_000)
        sync_api.expect(page.locator("#banner")).to_contain_text("needle", timeout=10_000)

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
