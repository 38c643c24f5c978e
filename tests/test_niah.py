"""Needle-in-a-haystack grid and scoring logic, on a fake engine (no model)."""

from __future__ import annotations

import json

from duo_qserve.eval.niah import (
    Grid,
    build_document,
    heat_map,
    insert_needle,
    run_grid,
    score_answer,
    score_table,
    write_results,
)


class WordTokenizer:
    """One token per space-separated word: enough to check lengths and positions."""

    def __init__(self):
        self.vocab: list[str] = []

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab.append(w)
            ids.append(self.vocab.index(w))
        return {"input_ids": ids}

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] for i in ids)


class FakeEngine:
    """Answers with the needle's number only if it lies in the last ``window`` words (a streaming-only model)."""

    _question_suffix = " Answer:"

    def __init__(self, window: int):
        self.tokenizer, self.window, self.doc = WordTokenizer(), window, ""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def document_ids(self, text: str) -> list[int]:
        return self.encode("Document: " + text)

    def ingest(self, text: str):
        self.doc = text
        return type("Info", (), {"tokens": len(self.document_ids(text))})()

    def answer(self, question: str, max_new_tokens: int) -> str:
        visible = self.doc.split()[-self.window :]
        numbers = [w.rstrip(".") for w in visible if w.rstrip(".").isdigit()]
        return f"The secret number is {numbers[0]}." if numbers else "I do not know."


def test_score_answer_is_exact_match_of_the_key():
    assert score_answer("The secret number is 4821377.", "4821377") == 1.0
    assert score_answer("It is 4,821,377", "4821377") == 1.0
    assert score_answer("The secret number is 482137.", "4821377") == 0.0
    assert score_answer("48213770", "4821377") == 0.0
    assert score_answer("no idea", "4821377") == 0.0


def test_insert_needle_at_depth():
    hay, needle = list(range(10)), [-1, -2]
    assert insert_needle(hay, needle, 0) == [-1, -2] + hay
    assert insert_needle(hay, needle, 50) == hay[:5] + needle + hay[5:]
    assert insert_needle(hay, needle, 100) == hay + needle


def test_document_has_the_requested_length_and_keys_are_shared():
    tok = WordTokenizer()
    hay = tok(" ".join(f"w{i}" for i in range(500)))["input_ids"]
    doc = build_document(tok, hay, "The secret number is 1234567.", length=200, depth=50, overhead=10)
    assert len(doc.split()) == 190
    assert doc.split().index("1234567.") == 92 + 4  # needle (5 words) after half of the 185 haystack words
    grid = Grid([100], [0.0], seed=3)
    assert grid.key(100, 0.0, 0) == Grid([100], [0.0], seed=3).key(100, 0.0, 0)
    assert len(grid.key(100, 0.0, 0)) == 7


def test_grid_scores_a_streaming_model_only_near_the_end(tmp_path):
    tok = WordTokenizer()
    hay = tok(" ".join(f"w{i}" for i in range(2000)))["input_ids"]
    grid = Grid(lengths=[200, 400], depths=[0.0, 50.0, 100.0])
    engine = FakeEngine(window=60)
    engine.tokenizer = tok
    records = run_grid(
        engine, grid, hay, "The secret number is {key}.", "What is the secret number?", log=lambda _: None
    )
    table = score_table(records, grid)
    assert table.tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]  # rows: depths, columns: lengths

    png = tmp_path / "niah-test-fake.png"
    heat_map(table, grid, "fake", png)
    out = write_results(
        tmp_path / "niah-test.json",
        {"device": "cpu", "date": "2026-01-01", "commit": "x", "command": "test"},
        [{"name": "fake", "mean_score": float(table.mean()), "grid": table.tolist()}],
    )
    data = json.loads(out.read_text())
    assert data["configurations"][0]["mean_score"] == 1 / 3

    write_results(out, {"command": "second"}, [{"name": "other", "mean_score": 1.0}], append=True)
    merged = json.loads(out.read_text())
    assert [c["name"] for c in merged["configurations"]] == ["fake", "other"]
    assert merged["command"] == "test && second"
    write_results(out, {"command": "second"}, [{"name": "other", "mean_score": 0.5}], append=True)
    assert json.loads(out.read_text())["command"] == "test && second"
    assert png.stat().st_size > 0
