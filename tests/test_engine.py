import random
import re
import threading

import pytest
import torch
from conftest import haystack_text

from duo_qserve.conversation import Conversation
from duo_qserve.engine import Cancelled, DocumentTooLarge, Engine, QuestionTooLong
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
    question_tokens = len(engine.question_ids(QUESTION))
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


def test_w8a8_prepares_the_default_model_with_its_shipped_recipe():
    """On-the-fly W8A8 of the default model applies the recipe shipped for it (quant/calibration/: a rotation,
    which changes the embedding and puts a Hadamard before down_proj); ``smoothing=None`` turns it off."""
    from duo_qserve.quant.w8a8 import SiluMulHadamardQuant

    shipped = Engine.from_pretrained("default", max_tokens=512, pattern=None, w8a8=True)
    plain = Engine.from_pretrained("default", max_tokens=512, pattern=None, w8a8=True, smoothing=None)
    assert shipped.stats()["rotated"] and not plain.stats()["rotated"]
    assert isinstance(shipped.model.layers[0].mlp.act, SiluMulHadamardQuant)
    assert not torch.equal(shipped.model.embed_tokens.weight, plain.model.embed_tokens.weight)


def test_two_threads_asking_at_once_get_the_answers_asked_in_turn(engine):
    doc, _ = planted_document(seed=8)
    engine.ingest(doc)
    questions = [QUESTION, "Who wrote this text?"]
    in_turn = [engine.answer(q, max_new_tokens=12) for q in questions]
    together = [None, None]
    start = threading.Barrier(2)

    def ask(i):
        start.wait()
        together[i] = engine.answer(questions[i], max_new_tokens=12)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == in_turn


def test_an_answer_stream_holds_the_engine_until_closed(engine):
    doc, _ = planted_document(seed=8)
    engine.ingest(doc)
    pieces = engine.ask("Summarize the document.", max_new_tokens=50)
    next(pieces)
    other = threading.Thread(target=lambda: engine.lock.acquire() and engine.lock.release())
    other.start()
    other.join(timeout=1.0)
    assert other.is_alive()  # the stream holds the engine lock
    pieces.close()
    other.join(timeout=10)
    assert not other.is_alive()


def test_long_question_is_refused_naming_it_and_the_document_still_answers(engine):
    doc, number = planted_document(seed=9)
    engine.ingest(doc)
    before = engine.prefilled_tokens
    question = "Please read this: " + haystack_text(100_000)
    with pytest.raises(
        QuestionTooLong, match=r"the question 'Please read this: .* tokens but only [\d,]+ are left"
    ):
        engine.answer(question)
    assert engine.prefilled_tokens == before
    assert number in engine.answer(QUESTION, max_new_tokens=16)


def test_long_question_is_prefilled_in_chunks(engine):
    doc, number = planted_document(seed=9, n_chars=3000)
    engine.ingest(doc)
    question = haystack_text(4000, start_file=3) + "\n\n" + QUESTION
    sizes = []
    hook = engine.model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].numel()))
    try:
        engine.answer(question, max_new_tokens=4)
    finally:
        hook.remove()
    n, chunk = engine.last.question_tokens, engine.chunk_size
    assert n > chunk
    passes = -(-n // chunk)
    assert sizes[:passes] == [chunk] * (passes - 1) + [n - (passes - 1) * chunk]
    assert set(sizes[passes:]) <= {1}  # then one token per decode step


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0), "top_p must be a number in \\(0, 1\\]"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(seed=-1), "seed"),
        (dict(stop="x"), "stop must be a sequence of strings"),
    ],
)
def test_invalid_sampling_parameters_raise_value_error(engine, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine.ask(QUESTION, **kwargs)


def test_a_cancel_before_a_job_starts_is_kept_for_it_and_only_for_it(engine):
    doc, _ = planted_document(seed=10)
    engine.cancel()
    with pytest.raises(Cancelled, match="stopped after 0 of"):
        engine.ingest(doc)
    engine.ingest(doc)  # the cancel was for the job that observed it
    engine.cancel()
    assert engine.answer(QUESTION, max_new_tokens=8) == ""
    assert engine.answer(QUESTION, max_new_tokens=8) != ""


def test_a_stream_closed_after_a_piece_keeps_that_piece_in_its_turn(engine):
    """What was yielded was shown: the conversation's turn holds it even when the stream is closed right after."""
    doc, _ = planted_document(seed=8)
    engine.ingest(doc)
    conversation = Conversation()
    pieces = engine.ask("Summarize the document.", max_new_tokens=20, conversation=conversation)
    first = next(pieces)
    pieces.close()
    assert first and conversation.turns[-1].answer == first and engine.last.ended_by == "cancel"
