import random
import re

import pytest
import torch
from conftest import haystack_text

from duo_qserve.engine import Cancelled, DocumentTooLarge, Engine
from duo_qserve.patterns import random_pattern, save_pattern

pytestmark = pytest.mark.slow
QUESTION = "According to the document, what is the secret number?"


def planted_document(seed: int, n_chars: int = 6000) -> tuple[str, str]:
    """~1,500 tokens of real essays with a secret number at a random depth (cut at a sentence boundary)."""
    rng = random.Random(seed)
    text = haystack_text(n_chars, start_file=seed)
    number = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.1, 0.9)
    cut = text.rfind(". ", 0, int(len(text) * depth)) + 2
    return text[:cut] + f"The secret number is {number}. " + text[cut:], number


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("default", max_tokens=4096, kv_bits=16, pattern=None)  # full attention


def test_default_model_finds_a_planted_fact(engine):
    doc, number = planted_document(seed=random.randrange(1000))
    info = engine.ingest(doc)
    assert 1200 < info.tokens < 2000
    assert number in engine.answer(QUESTION, max_new_tokens=16)


def test_second_question_prefills_only_its_own_tokens(engine):
    doc, number = planted_document(seed=3)
    info = engine.ingest(doc)
    assert engine.prefilled_tokens >= info.tokens
    engine.answer("What is this text about?", max_new_tokens=8)
    before = engine.prefilled_tokens
    answer = engine.answer(QUESTION, max_new_tokens=16)
    question_tokens = len(engine.encode(QUESTION + engine._question_suffix))
    assert engine.prefilled_tokens - before == question_tokens == engine.last.question_tokens
    assert number in answer


def test_document_too_large_is_refused_before_prefill(engine):
    doc, _ = planted_document(seed=4)
    engine.ingest(doc)
    before = engine.prefilled_tokens
    with pytest.raises(DocumentTooLarge, match="holds 3,072 document tokens"):
        engine.ingest(haystack_text(30000))
    assert engine.prefilled_tokens == before
    assert engine.document is not None  # the loaded document is kept


def test_cancel_stops_prefill_and_answers(engine):
    doc, _ = planted_document(seed=5)

    def cancel_after_first_chunk(done, total):
        engine.cancel()

    with pytest.raises(Cancelled, match="no document is loaded"):
        engine.ingest(doc, on_progress=cancel_after_first_chunk)
    assert engine.document is None
    engine.ingest(doc)
    pieces = engine.ask("Summarize the document.", max_new_tokens=50)
    next(pieces)
    engine.cancel()
    assert len(list(pieces)) <= 1  # at most the piece already being produced


def test_stop_strings_cut_the_answer(engine):
    doc, number = planted_document(seed=6)
    engine.ingest(doc)
    answer = engine.answer(QUESTION, max_new_tokens=16, stop=[number])
    assert number not in answer


def test_checkpoint_restore_matches_fresh_ingests(tmp_path):
    """DuoAttention at 50% with KV4: two questions after one ingest answer exactly as after two fresh ingests
    (the streaming rings and fp tails are restored, not just the length)."""
    probe = Engine.from_pretrained("default", max_tokens=512, pattern=None)
    save_pattern(
        tmp_path / "p", random_pattern(probe.args, seed=0).gates, {"sink_size": 16, "recent_size": 64}
    )
    kw = dict(max_tokens=4096, pattern=str(tmp_path / "p"), sparsity=0.5, kv_bits=4, chunk_size=256)
    doc, _ = planted_document(seed=7)
    questions = [QUESTION, "Who wrote this?"]
    shared = Engine.from_pretrained("default", **kw)
    shared.ingest(doc)
    reused = [shared.answer(q, max_new_tokens=12) for q in questions]
    fresh = []
    for q in questions:
        e = Engine.from_pretrained("default", **kw)
        e.ingest(doc)
        fresh.append(e.answer(q, max_new_tokens=12))
    assert reused == fresh
    assert re.search(r"\w", reused[0])


def test_w8a8_smooths_the_default_model_with_its_shipped_statistics():
    """On-the-fly W8A8 of the default model applies SmoothQuant from the statistics shipped for it (folded
    into the norms, so the weights differ from plain W8A8); ``smoothing=None`` turns it off."""
    smoothed = Engine.from_pretrained("default", max_tokens=512, pattern=None, w8a8=True)
    plain = Engine.from_pretrained("default", max_tokens=512, pattern=None, w8a8=True, smoothing=None)
    assert smoothed.stats()["smoothquant"] and not plain.stats()["smoothquant"]
    norm = [e.model.layers[0].input_layernorm.weight for e in (smoothed, plain)]
    assert not torch.equal(*norm)
