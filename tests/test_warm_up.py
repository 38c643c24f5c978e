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


def test_warming_a_book_cache_restores_it_and_keeps_answers():
    """``Engine._warm_cache`` (run by ``ingest`` and ``attach_document`` on a GPU; here called directly) answers a
    tiny question on the checkpointed book, then puts everything back: the state the held tokens use (slots
    past them may hold the scratch answer, as after any answer), the counters, ``last``, and so the next
    answer."""
    engine = Engine.from_pretrained("default", device="cpu", max_tokens=2048)
    text = haystack_text(1500)
    info = engine.ingest(text[:700] + " The secret number is 48213. " + text[700:])
    before = engine.answer(QUESTION, max_new_tokens=12, temperature=0.0)
    engine.cache.restore()
    state = _state(engine)
    tensors = [{n: t.clone() for n, t in layer.items()} for layer in engine.cache.layers]
    engine._warm_cache(info.ids)
    assert _state(engine) == state and engine.cache.seq_len == info.tokens
    for layer, saved in zip(engine.cache.layers, tensors, strict=True):  # the state: what the held tokens use
        valid = {n: engine.cache.spec.valid_len(n, info.tokens) for n in saved}
        assert all(torch.equal(layer[n][:, : valid[n]], t[:, : valid[n]]) for n, t in saved.items())
    assert engine.answer(QUESTION, max_new_tokens=12, temperature=0.0) == before


def _compiled_variants() -> dict[str, int]:
    """How many compiled variants each of our Triton kernels holds (an autotuner's inner kernel counted)."""
    from duo_qserve.kernels import attention, decode_step, int8_gemm, kv_attention, kv_quantize, quantize_act

    counts = {}
    for module in (attention, decode_step, int8_gemm, kv_attention, kv_quantize, quantize_act):
        for name, obj in vars(module).items():
            caches = getattr(getattr(obj, "fn", obj), "device_caches", None)
            if caches:
                if not all(isinstance(c[0], dict) for c in caches.values()):
                    pytest.skip("this Triton keeps its compiled kernels in another structure")
                counts[f"{module.__name__}.{name}"] = sum(len(c[0]) for c in caches.values())
    return counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_after_ingest_the_first_answer_compiles_nothing():
    """The warm-up compiles what every cache shares; ``ingest`` warms what the book's cache sizes select. So the
    first question about a book of a size never seen (a question pre-fill, decode steps across a key-group
    boundary) compiles no kernel and captures no decode graph."""
    from duo_qserve.engine import EngineSettings
    from duo_qserve.loading import load_model

    loaded = load_model("synthetic:qwen2.5-coder-0.5b", "cuda")
    engine = Engine(loaded, EngineSettings(model=loaded.source, w8a8=True, max_tokens=40_000))
    engine.warm_up()
    gen = torch.Generator().manual_seed(1)
    vocab = loaded.model.args.vocab_size
    for n in (3_000, 21_000):  # caches of sizes the warm-up's scratch cache did not have
        engine.use(engine.new_cache(n), None)
        engine.ingest(torch.randint(vocab, (n,), generator=gen).tolist())
        compiled, decoder = _compiled_variants(), engine._decoder
        assert (
            compiled and decoder is not None and decoder.cache is engine.cache and decoder.graph is not None
        )
        with torch.inference_mode():
            engine.cache.restore()
            engine._prefill(torch.randint(vocab, (23,), generator=gen).tolist())
            for token in torch.randint(vocab, (140,), generator=gen).tolist():
                engine._decode_step(token)
        assert _compiled_variants() == compiled and engine._decoder is decoder
