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
                        "capturing the decode graph", "finding an answer's passages"]  # fmt: skip
    assert _state(engine) == state
    for layer, saved in zip(engine.cache.layers, tensors, strict=True):
        assert all(torch.equal(layer[n], t) for n, t in saved.items())
    assert engine.answer(QUESTION, max_new_tokens=12, temperature=0.0) == before
    assert "48213" in before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_after_warm_up_no_input_length_tunes_a_gemm_again():
    """On the GPU the warm-up tunes every row-count bucket of the W8A8 GEMMs, so no later pre-fill (a question, a
    follow-up with earlier turns, a document chunk of any length) pays a tuning: the autotuners' caches stay as
    the warm-up left them."""
    from duo_qserve.engine import EngineSettings
    from duo_qserve.kernels import int8_gemm
    from duo_qserve.loading import load_model

    loaded = load_model("synthetic:qwen2.5-coder-0.5b", "cuda")
    engine = Engine(loaded, EngineSettings(model=loaded.source, w8a8=True, max_tokens=40_000))
    engine.warm_up()
    tuners = (int8_gemm._prefill_gemm, int8_gemm._decode_gemm, int8_gemm._gemv)
    tuned = [dict(t.cache) for t in tuners]
    assert all(tuned)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n in (9, 100, 700, 3000, 5000, 30_000):
            engine._prefill(torch.randint(loaded.model.args.vocab_size, (n,), generator=gen).tolist())
    assert [dict(t.cache) for t in tuners] == tuned
