"""The one data module: where essays come from, the calibration split no evaluation reads, the pydocs haystack."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from conftest import HAYSTACK

from duo_qserve import data, environment
from duo_qserve.environment import REPO_ROOT


def _essays(tmp_path, n: int):
    for i in range(n):
        (tmp_path / f"e{i:02d}.txt").write_text(f"essay {i}")
    return tmp_path


def test_essays_come_from_the_argument_else_the_environment_else_a_clear_error(tmp_path, monkeypatch):
    d = _essays(tmp_path, 9)
    monkeypatch.delenv(environment.ESSAYS, raising=False)
    with pytest.raises(FileNotFoundError, match=r"--essays DIR.*DUO_QSERVE_ESSAYS"):
        data.essays_dir()
    assert data.essays_dir(d) == d
    monkeypatch.setenv(environment.ESSAYS, str(d))
    assert data.essays_dir() == d
    with pytest.raises(FileNotFoundError, match="no \\*.txt essays"):
        data.essays_dir(tmp_path / "missing")


def test_calibration_and_evaluation_splits_are_disjoint_and_cover_every_file(tmp_path):
    d = _essays(tmp_path, 12)
    calib, rest = data.essay_files("calibration", d), data.essay_files("evaluation", d)
    assert [f.name for f in calib] == [f"e{i:02d}.txt" for i in range(4, 12)]
    assert not set(calib) & set(rest) and len(calib) + len(rest) == 12
    assert "essay 3" in data.essay_text("evaluation", d) and "essay 4" not in data.essay_text("evaluation", d)
    with pytest.raises(ValueError, match="unknown split"):
        data.essay_files("train", d)
    few = tmp_path / "few"
    few.mkdir()
    with pytest.raises(FileNotFoundError, match="at least 9"):
        data.essay_files("evaluation", _essays(few, 8))


def test_every_shipped_recipe_was_made_on_calibration_essays_only():
    """A shipped recipe names the text it was made on (metadata ``text``); statistics (tensors) need some text,
    and none of it may be an evaluation essay. Rotation-only recipes use no text at all."""
    if not HAYSTACK.is_dir():
        pytest.skip(f"shared essays not found at {HAYSTACK}")
    from safetensors import safe_open

    calibration = {f.name for f in data.essay_files("calibration", HAYSTACK)}
    shipped = sorted((REPO_ROOT / "duo_qserve" / "quant" / "calibration").glob("*.safetensors"))
    assert shipped
    for path in shipped:
        with safe_open(str(path), "pt") as f:
            used, has_statistics = set(f.metadata()["text"].split()), bool(list(f.keys()))
        assert used <= calibration, path.name
        assert bool(used) == has_statistics, path.name


def test_pydocs_is_long_enough_for_32k_tokens_and_the_same_in_a_fresh_process():
    text = data.pydocs_text()
    assert len(text) >= 150_000  # ~4 characters per token (Qwen's rate on prose): >= 32K tokens
    assert " at 0x" not in text and "\nFILE\n" not in text and "\nDATA\n" not in text
    assert "class TextWrapper" in text
    code = "import hashlib, duo_qserve.data as d; print(hashlib.sha256(d.pydocs_text().encode()).hexdigest())"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == hashlib.sha256(text.encode()).hexdigest()
