"""``python -m duo_qserve info``: a summary for people by default, the full stats as JSON with --json."""

from __future__ import annotations

import json

import pytest

from duo_qserve.__main__ import main

pytestmark = pytest.mark.slow
ARGS = ["info", "--cpu", "--max-tokens", "512", "--pattern", "none"]


def test_info_prints_a_readable_summary_and_json_on_request(capsys):
    assert main(ARGS) == 0
    text = capsys.readouterr().out
    assert text.startswith("model      SmolLM2-135M-Instruct on cpu") and "capacity   512 tokens" in text
    assert "GiB" in text and "{" not in text
    assert main([*ARGS, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["capacity_tokens"] == 512 and stats["memory"]["weights"] > 0
