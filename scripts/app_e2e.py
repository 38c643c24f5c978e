"""The app end to end, as a user drives it: start ``python -m app.main``, upload a book, pre-fill it, ask
questions, and record what the user waits for.

Through gradio_client (the app's HTTP API, the same calls the browser makes): /read, /prefill, then /ask per
question with greedy decoding. The time to the first answer token is taken on the client, from submitting the
question to the first streamed piece of text; the server's own figures (its answer-stats line) are kept beside it.

    python scripts/app_e2e.py --model qwen2.5-coder-1.5b --book BOOK.txt --question "..." --question "..." \
        --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from duo_qserve import environment

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, proc: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until the app answers at ``url``; raises if it exits or does not answer in time."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5):
                return time.monotonic() - t0
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the app did not answer at {url} within {timeout_s:.0f} s")


PLACEHOLDER = "…"  # what the app shows in the answer bubble before the first token


def answer_text(history: list[dict]) -> str:
    """The assistant's answer so far (empty while only the question or the placeholder is shown)."""
    if not history or history[-1]["role"] != "assistant":
        return ""
    content = history[-1]["content"]
    text = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    return "" if text == PLACEHOLDER else text


def ask(client, question: str, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    job = client.submit(question, [], 0.0, 1.0, max_new_tokens, api_name="/ask")
    first = None
    while not job.done():
        outputs = job.outputs()
        if first is None and outputs and answer_text(outputs[-1][0]):
            first = time.perf_counter() - t0
        time.sleep(0.005)
    history, _question, stats = job.result()
    total = time.perf_counter() - t0
    if first is None:  # the whole answer came in one update
        first = total
    return {"question": question, "client_ttft_s": first, "seconds": total, "server_stats": stats,
            "answer": answer_text(history)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--book", type=Path, required=True)
    p.add_argument("--question", action="append", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("app_args", nargs="*", help="more flags for app.main (after --)")
    a = p.parse_args(argv)
    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    cmd = [sys.executable, "-m", "app.main", "--model", a.model, "--port", str(port), *a.app_args]
    t_start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True
    )
    try:
        startup_s = wait_until_serving(url, proc, a.start_timeout)
        client = Client(url, verbose=False)
        t0 = time.perf_counter()
        summary, _chapters = client.predict([handle_file(str(a.book))], "", api_name="/read")
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _progress, status = client.submit(api_name="/prefill").result()
        prefill_s = time.perf_counter() - t0
        print(status, flush=True)
        answers = []
        for q in a.question:
            answers.append(ask(client, q, a.max_new_tokens))
            print(json.dumps(answers[-1], indent=1), flush=True)
        client.close()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    result = {
        "device": _device(), "date": datetime.date.today().isoformat(), "commit": environment.commit(),
        "command": " ".join(["python scripts/app_e2e.py", *(sys.argv[1:] if argv is None else argv)]),
        "app_command": " ".join(cmd[1:]), "book": a.book.name, "book_chars": len(a.book.read_text(errors="replace")),
        "startup_s": startup_s, "read_s": read_s, "read_summary": summary, "prefill_s": prefill_s,
        "prefill_status": status, "answers": answers, "total_s": time.monotonic() - t_start,
    }  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"app-e2e-{a.model}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", path)
    return 0


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
