"""Needle in a haystack: scoring, needle placement, documents, needles files, intervals and the run loop on a fake
engine (no model); then one tiny real run on the default model."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch

from duo_qserve import data
from duo_qserve.eval import niah
from duo_qserve.eval.niah import (
    BUILTIN_NEEDLES,
    Grid,
    Haystack,
    Needle,
    NeedleFileError,
    Progress,
    found,
    load_needles,
    make_document,
    needle_pools,
    needle_position,
    plant,
    rate,
    run,
    summarize,
    wilson,
)


class WordTokenizer:
    """One token per space-separated word: enough to check lengths and positions exactly."""

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
    """Sees only the last ``window`` words of the document (a streaming-only model); answers a built-in needle's
    question when it sees that needle, after a blank line and followed by a second line."""

    def __init__(self, window: int, tokenizer: WordTokenizer):
        self.tokenizer, self.window, self.doc, self.ingests = tokenizer, window, "", 0

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def question_ids(self, question: str) -> list[int]:
        return self.encode(question + " Answer:")

    def document_ids(self, text: str) -> list[int]:
        return self.encode("Document: " + text)

    def ingest(self, text: str):
        self.doc, self.ingests = text, self.ingests + 1
        return type("Info", (), {"tokens": len(self.document_ids(text))})()

    def ask(self, question: str, max_new_tokens: int, evidence: bool = False):
        visible = " ".join(self.doc.split()[-self.window :])
        template = next(n.template for n in BUILTIN_NEEDLES if n.question == question)
        hit = re.search(re.escape(template).replace(re.escape("{answer}"), r"(\S+?)"), visible)
        yield from ["\n", hit.group(1) if hit else "I do not know", ".\nMore text", " never read"]


def sentences(n_words: int, per_sentence: int = 10) -> str:
    return " ".join(f"w{i}." if i % per_sentence == per_sentence - 1 else f"w{i}" for i in range(n_words))


def test_numbers_are_found_as_whole_numbers_and_words_as_whole_words_in_any_case():
    assert found("number", "The secret number is 4821377.", "4821377")
    assert found("number", "It is 4,821,377", "4821377")
    assert not found("number", "The secret number is 482137.", "4821377")
    assert not found("number", "48213770", "4821377")
    assert found("word", "The cat is called ferdinand.", "Ferdinand")
    assert found("word", "FERDINAND", "Ferdinand")
    assert not found("word", "Ferdinando", "Ferdinand")
    assert not found("word", "the 4821377th", "4821377")
    assert found("word", "It was the Blue Harbor, I think", "blue harbor")


def test_wilson_interval_matches_known_values():
    assert wilson(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert all(np.isnan(wilson(0, 0)))


def test_needles_go_at_the_depth_moved_back_to_a_sentence_start():
    tok = WordTokenizer()
    hay = Haystack("t", sentences(200), tok)
    rng = random.Random(0)
    ids, starts = hay.take(rng, 100)
    assert starts[0] and len(ids) == 100
    assert needle_position(starts, 50) == 50  # token 49 ends a sentence
    assert needle_position(starts, 57) == 50  # moved back to its sentence's start
    assert needle_position(starts, 0) == 0 and needle_position(starts, 100) == 100
    assert needle_position(np.zeros(1000, dtype=bool), 50) == 500  # no sentence start within reach: stays
    needle = tok("The secret number is 1234567.")["input_ids"]
    other = tok("The password is quince.")["input_ids"]
    planted, where = plant(ids, [needle, other], [80, 20])
    assert where == [80 + len(other), 20]
    assert planted[where[0] : where[0] + len(needle)] == needle and planted[20 : 20 + len(other)] == other
    assert planted[: where[1]] == ids[:20] and len(planted) == 100 + len(needle) + len(other)


def test_a_two_facts_document_has_two_needles_at_two_grid_depths_and_the_requested_length():
    tok = WordTokenizer()
    engine = FakeEngine(window=10_000, tokenizer=tok)
    hay = Haystack("t", sentences(3000), tok)
    grid = Grid([400], [10.0, 30.0, 50.0, 70.0, 90.0], ["two-facts"], seed=3)
    doc = make_document(engine, hay, BUILTIN_NEEDLES, grid, 0, "two-facts", 400, 30.0)
    assert [f.depth for f in doc.facts] == [30.0, 70.0]  # half the depth list away
    assert doc.facts[0].needle != doc.facts[1].needle and doc.facts[0].answer != doc.facts[1].answer
    words = doc.text.split()
    for fact in doc.facts:
        at = doc.text.index(fact.needle)
        assert abs(len(doc.text[:at].split()) / len(words) * 100 - fact.depth) < 5
    longest = max(len(engine.question_ids(f.question)) for f in doc.facts)
    assert len(engine.document_ids(doc.text)) + longest == 400
    again = make_document(engine, hay, BUILTIN_NEEDLES, grid, 0, "two-facts", 400, 30.0)
    assert again.text == doc.text  # the seed and the cell decide everything


def test_needles_file_is_parsed_and_bad_files_say_what_is_wrong(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"kind": "word", "needle": "The cat is {answer}.", "question": "Who is the cat?", "answers": ["Tom"]}\n'
        "\n"
        '{"kind": "number", "needle": "The code is {answer}.", "question": "What is the code?"}\n'
    )
    needles = load_needles(good)
    assert needles == [
        Needle("word", "The cat is {answer}.", "Who is the cat?", ("Tom",)),
        Needle("number", "The code is {answer}.", "What is the code?"),
    ]
    assert len(needles[1].draw(random.Random(0))) == 7
    assert set(needle_pools(needles, ["number", "word", "two-facts"])) == {"number", "word", "two-facts"}
    with pytest.raises(ValueError, match="needs two needles"):
        needle_pools(needles[:1], ["two-facts"])
    with pytest.raises(ValueError, match="needs a number needle"):
        needle_pools(needles[:1], ["number"])

    cases = {
        "not json": "not JSON",
        "[1]": "expected a JSON object",
        '{"kind": "date", "needle": "{answer}", "question": "q"}': "kind must be",
        '{"kind": "word", "needle": "no slot", "question": "q", "answers": ["a"]}': "exactly once",
        '{"kind": "word", "needle": "{answer} {x}", "question": "q", "answers": ["a"]}': "braces",
        '{"kind": "word", "needle": "{answer}", "question": " ", "answers": ["a"]}': "question",
        '{"kind": "word", "needle": "{answer}", "question": "q"}': "needs answers",
        '{"kind": "word", "needle": "{answer}", "question": "q", "answers": "a"}': "list of non-empty",
        '{"kind": "number", "needle": "{answer}", "question": "q", "answers": ["12a"]}': "digits",
        '{"kind": "word", "needle": "{answer}", "question": "q", "answers": ["a"], "hint": 1}': "unknown field",
    }
    for i, (line, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text('{"kind": "number", "needle": "{answer}", "question": "q"}\n' + line + "\n")
        with pytest.raises(NeedleFileError, match=rf"bad{i}.jsonl:2: .*{message}"):
            load_needles(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(NeedleFileError, match="no needles"):
        load_needles(tmp_path / "empty.jsonl")
    with pytest.raises(NeedleFileError, match="cannot be read"):
        load_needles(tmp_path / "missing.jsonl")


def test_haystack_specs_name_builtins_or_files(tmp_path):
    (tmp_path / "a.md").write_text("Alpha text.")
    (tmp_path / "b.txt").write_text("Beta text.")
    name, source, text = niah.haystack_text(f"mine={tmp_path}")
    assert (name, source) == ("mine", str(tmp_path)) and text == "Alpha text.\n\nBeta text."
    assert niah.haystack_text("pydocs")[2] == data.pydocs_text()
    for bad in ("nonsense", f"x={tmp_path / 'missing'}", "=x"):
        with pytest.raises(ValueError, match="--haystack"):
            niah.haystack_text(bad)


def test_builtin_answers_occur_in_neither_builtin_haystack():
    text = data.essay_text("evaluation") + data.pydocs_text()
    words = set(re.findall(r"\w+", text.lower()))
    answers = {a.lower() for n in BUILTIN_NEEDLES for a in n.answers}
    assert not answers & words


def test_run_answers_every_document_on_every_configuration_and_stops_cleanly_at_the_deadline():
    tok = WordTokenizer()
    hay = Haystack("t", sentences(5000), tok)
    grid = Grid(lengths=[200, 400], depths=[10.0, 50.0, 90.0], kinds=["number", "two-facts"], trials=2)
    pools = needle_pools(BUILTIN_NEEDLES, grid.kinds)
    engines = {
        "stream": FakeEngine(window=60, tokenizer=tok),
        "full": FakeEngine(window=10**6, tokenizer=tok),
    }
    progress = run(engines, [hay], pools, grid, Progress.start(engines), log=lambda _: None)
    assert progress.stopped == "finished" and progress.trials_completed == 2 and progress.documents == 24
    assert [engine.ingests for engine in engines.values()] == [
        24,
        24,
    ]  # one ingest per document, two questions
    full, stream = progress.records["full"], progress.records["stream"]
    assert len(full) == len(stream) == 2 * 2 * 3 * (1 + 2)
    assert all(r["found"] for r in full) and all(
        r["answer"] == r["expected"] + "." for r in full
    )  # the first line
    s = summarize(stream, grid)
    assert s["table"][0] == [0.0, 0.0] and s["table"][2][0] == 1.0  # a streaming model sees only the end
    assert s["by_kind"]["two-facts"]["questions"] == 2 * 2 * 3 * 2 and 0 < s["found"] < 1
    lo, hi = s["ci95"]
    assert lo < s["found"] < hi

    progress = run(engines, [hay], pools, grid, Progress.start(engines), deadline=0.0, log=lambda _: None)
    assert progress.stopped == "deadline" and progress.documents == 0 and progress.trials_completed == 0


@pytest.fixture
def one_thread():
    """One torch thread: on a shared CPU more threads than free cores make a small model many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_tiny_run_on_the_default_model_writes_results_and_heat_maps(tmp_path, capsys, one_thread):
    argv = ["--model", "default", "--device", "cpu", "--configs", "full16,kv4", "--lengths", "512",
            "--depths", "25,75", "--kinds", "two-facts", "--haystack", "essays", "--max-new-tokens", "16",
            "--key-group", "64", "--out-dir", str(tmp_path)]  # fmt: skip
    assert niah.main(argv) == 0
    (out,) = tmp_path.glob("niah-smollm2-135m-*.json")
    res = json.loads(out.read_text())
    assert (
        res["model"] == "SmolLM2-135M-Instruct" and res["commit"] and "--configs full16,kv4" in res["command"]
    )
    assert res["progress"]["stopped"] == "finished" and res["progress"]["documents"] == 2
    assert [c["name"] for c in res["configurations"]] == ["full16", "kv4"]
    full, kv4 = res["configurations"]
    assert full["engine"]["kv_bits"] == 16 and kv4["engine"]["kv_bits"] == 4 and not kv4["engine"]["w8a8"]
    assert kv4["engine"]["key_group"] == 64
    assert full["questions"] == kv4["questions"] == 4  # two documents, two questions each
    assert [r["expected"] for r in full["records"]] == [r["expected"] for r in kv4["records"]]
    assert all(500 <= r["tokens"] <= 524 for r in full["records"])
    assert len(full["table"]) == 2 and full["ci95"][0] <= full["found"] <= full["ci95"][1]
    assert (tmp_path / full["heat_map"]).stat().st_size > 0
    assert "| full16 (full attention" in capsys.readouterr().out


def test_rate_counts_the_top_passage_among_found_answers_only():
    records = [
        dict(found=True, top_passage_has_needle=True),
        dict(found=True, top_passage_has_needle=False),
        dict(found=True, top_passage_has_needle=True),
        dict(found=False, top_passage_has_needle=False),
    ]
    assert rate(records)["top_passage"] == 2 / 3
    assert "top_passage" not in rate([dict(found=True)])  # a run without --evidence
