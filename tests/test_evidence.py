"""Where an answer came from, on SmolLM2 on the CPU: the top passage holds a planted needle, decoding is unchanged
by the evidence pass, and the cache method it reads agrees with what the cache attends over."""

from __future__ import annotations

import pytest
import torch
from conftest import haystack_text

from duo_qserve.engine import Engine
from duo_qserve.evidence import describe, passage_text

pytestmark = pytest.mark.slow
QUESTION = "According to the document, what is the secret number?"


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("default", device="cpu", max_tokens=4096)  # trained pattern, 50%, KV4


@pytest.mark.parametrize("start_file,depth", [(0, 0.5), (1, 0.3), (2, 0.7)])
def test_top_passage_holds_the_needle(engine, start_file, depth):
    text = haystack_text(8000, start_file=start_file)  # ~1,900 tokens
    cut = text.rfind(". ", 0, int(len(text) * depth)) + 2
    needle = "The secret number is 48213."
    doc = text[:cut] + needle + " " + text[cut:]
    engine.ingest(doc)
    plain = engine.answer(QUESTION, max_new_tokens=16)
    assert not engine.last.evidence
    answer = engine.answer(QUESTION, max_new_tokens=16, evidence=True)
    assert answer == plain and "48213" in answer
    passages = engine.last.evidence
    assert len(passages) == 3 and engine.last.evidence_s > 0
    assert needle in passage_text(passages[0], engine.document.ids, engine.tokenizer)
    spans = sorted((p["start"], p["end"]) for p in passages)
    assert all(a[1] <= b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))  # no overlap
    shown = describe(passages, engine.document_text_start, engine.tokenizer, engine.document.ids,
                     [("Opening", 0), ("Later", 10**6)])  # fmt: skip
    assert shown[0]["chapter"] == "Opening" and "48213" in shown[0]["snippet"]
    assert 0 < shown[0]["share"] < 1


def test_no_evidence_pass_when_the_stream_is_closed(engine):
    """A caller that closes the stream (the answer cut off from outside) gets no extra model pass."""
    engine.ingest(haystack_text(3000))
    stream = engine.ask(QUESTION, max_new_tokens=16, evidence=True)
    next(stream)
    stream.close()
    assert engine.last.ended_by == "cancel" and engine.last.answer_tokens >= 1
    assert engine.last.evidence == [] and engine.last.evidence_s == 0


def test_retrieval_keys_cover_quantized_groups_and_the_tail(engine):
    engine.ingest(haystack_text(3000))
    cache, layer = engine.cache, next(i for i, n in enumerate(engine.cache.n_retrieval) if n)
    held = cache.seq_len
    assert held % cache.config.key_group  # a partial group sits in the fp tail
    whole = cache.retrieval_keys(layer, 0, held)
    assert whole.shape == (cache.n_retrieval[layer], held, cache.args.head_dim)
    assert torch.equal(cache.retrieval_keys(layer, 100, held - 5), whole[:, 100 : held - 5])
    assert cache.retrieval_keys(layer, 7, 7).shape[1] == 0
    with pytest.raises(ValueError):
        cache.retrieval_keys(layer, 0, held + 1)
