"""``Engine.warm_up`` on the CPU: it leaves the engine exactly as it found it, and answers do not change."""

from __future__ import annotations

import pytest
import torch
from conftest import haystack_text

from duo_qserve.engine import Engine

pytestmark = pytest.mark.slow
QUESTION = "According to the document, what is the secret number?"


def _state(engine: Engine) -> tuple:
    return (
        engine.cache,
        engine.cache.seq_len,
        engine.document,
        engine.conversation_in_cache,
        engine._decoder,
        engine.last,
        engine.prefilled_tokens,
    )


def test_warm_up_restores_the_engine_and_keeps_answers():
    engine = Engine.from_pretrained("default", device="cpu", max_tokens=2048)
    empty = _state(engine)
    assert engine.warm_up() > 0
    assert _state(engine) == empty and engine.document is None and engine.cache.seq_len == 0

    text = haystack_text(2000)
    engine.ingest(text[:1000] + " The secret number is 48213. " + text[1000:])
    before = engine.answer(QUESTION, max_new_tokens=12, temperature=0.0)
    state = _state(engine)
    tensors = [{n: t.clone() for n, t in layer.items()} for layer in engine.cache.layers]
    messages: list[str] = []
    engine.warm_up(messages.append)
    assert messages == ["compiling the pre-fill kernels", "tuning for question-sized inputs",
                        "capturing the decode graph"]  # fmt: skip
    assert _state(engine) == state
    for layer, saved in zip(engine.cache.layers, tensors, strict=True):
        assert all(torch.equal(layer[n], t) for n, t in saved.items())
    assert engine.answer(QUESTION, max_new_tokens=12, temperature=0.0) == before
    assert "48213" in before
