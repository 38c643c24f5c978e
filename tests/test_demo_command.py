"""The README's first command end to end: ``bash scripts/run_demo.sh`` serves, answers through the API, stops.

Starts the script as a user would (headless, on a free port, the CPU), uploads a short document with a planted
fact through gradio_client, reads the streamed answer, then stops the server with Ctrl-C (SIGINT) and expects a
clean exit. scripts/test.sh has already set up .venv, so the script's own set-up step is the quick path here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request

import pytest
from conftest import haystack_text
from gradio_client import Client, handle_file
from test_app import QUESTION, SECRET, answer_text, free_port

from duo_qserve.environment import REPO_ROOT

pytestmark = pytest.mark.slow
# set-up (done) + the demo model installed once (a 491 MB download) + its load + app start
START_TIMEOUT_S = 900


def _wait_until_serving(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run_demo.sh exited with {proc.returncode}:\n{proc.stdout.read()[-5000:]}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the app did not answer at {url} within {START_TIMEOUT_S} s")


def _ctrl_c_as_in_a_terminal() -> None:
    """In the child: Ctrl-C's default action, as in a terminal, also when this test runs where SIGINT is ignored
    (a command started in the background by a non-interactive shell, as CI may be, inherits SIG_IGN, and Python
    then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_run_demo_serves_answers_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {**os.environ, "DUO_QSERVE_LIBRARY": str(tmp_path / "library"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        ["bash", "scripts/run_demo.sh", "--port", str(port), "--cpu", "--max-tokens", "2048"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, proc)
        text = haystack_text(1400)
        book = tmp_path / "needle.txt"
        book.write_text(text[:700] + f" The secret number is {SECRET}. " + text[700:])
        client = Client(url, verbose=False)
        summary, _chapters = client.predict([handle_file(str(book))], "", api_name="/read")
        assert "Fits" in summary, summary
        _progress, status = client.submit(api_name="/prefill").result(timeout=180)
        assert "Loaded **needle**" in status, status
        job = client.submit(QUESTION, [], 0.0, 1.0, 32, api_name="/ask")
        history, _question, _stats = job.result(timeout=180)
        assert SECRET in answer_text(history)
        assert len({answer_text(out[0]) for out in job.outputs()[:-1]}) > 2, "the answer did not stream"
        client.close()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGUSR1)  # the app prints every thread's stack (faulthandler)
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise AssertionError(
                f"the app did not stop within 30 s of Ctrl-C; its output ends:\n{output[-6000:]}"
            ) from None
    assert proc.returncode in (0, -signal.SIGINT, 130), (proc.returncode, output[-3000:])
    assert "Traceback" not in output, output[-5000:]
