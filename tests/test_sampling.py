"""The sampling guards against loops (on made-up logits, then on the default model's real loop) and validation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import haystack_text

from duo_qserve.engine import Engine
from duo_qserve.sampling import AnswerGuard, Sampling

LOOPING = "Repeat the word 'yes' forever."  # the default model answers this with one line, again and again


def test_the_penalty_lowers_only_the_answers_own_tokens():
    guard = AnswerGuard(Sampling(repetition_penalty=2.0, repeat_stop=0), 4, torch.device("cpu"))
    guard.add(0)
    guard.add(1)
    logits = torch.tensor([4.0, -1.0, 3.0, 1.0])
    assert guard.adjust(logits).tolist() == [2.0, -2.0, 3.0, 1.0]
    assert logits.tolist() == [4.0, -1.0, 3.0, 1.0]  # the caller's logits are untouched


def test_no_repeat_ngram_forbids_the_token_that_would_repeat_an_ngram():
    guard = AnswerGuard(
        Sampling(repetition_penalty=1.0, no_repeat_ngram=3, repeat_stop=0), 5, torch.device("cpu")
    )
    for t in (1, 2, 3, 1, 2):  # "1 2 3" was said: after "1 2", 3 is banned
        guard.add(t)
    out = guard.adjust(torch.zeros(5))
    assert out[3] == -math.inf and torch.isfinite(out[[0, 1, 2, 4]]).all()


def test_repeat_stop_fires_when_the_last_tokens_occurred_before_and_not_earlier():
    guard = AnswerGuard(Sampling(repeat_stop=3), 10, torch.device("cpu"))
    said = [guard.add(t) for t in (1, 2, 3, 4, 1, 2)]
    assert not any(said)
    assert guard.add(3)  # "1 2 3" again


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(repetition_penalty=0.5), "repetition_penalty must be a finite number >= 1"),
        (dict(repetition_penalty=math.nan), "repetition_penalty"),
        (dict(no_repeat_ngram=1), "no_repeat_ngram must be 0 \\(off\\) or an integer >= 2"),
        (dict(no_repeat_ngram=2.0), "no_repeat_ngram"),
        (dict(repeat_stop=-1), "repeat_stop must be 0 \\(off\\) or a positive integer"),
        (dict(repeat_stop=True), "repeat_stop"),
        (dict(top_p=0), "top_p"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_sampling_parameters_are_refused_saying_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


@pytest.mark.slow
def test_a_greedy_loop_is_stopped_by_the_repeat_stop_and_broken_by_the_defaults():
    engine = Engine.from_pretrained("default", max_tokens=2048, pattern=None)
    engine.ingest(haystack_text(1500))
    greedy = engine.answer(LOOPING, max_new_tokens=96, **vars(Sampling.greedy()))
    assert engine.last.ended_by == "max_tokens" and engine.last.answer_tokens == 96
    line = greedy.split("\n")[1]
    assert greedy.count(line) >= 4, greedy  # it really loops

    engine.answer(LOOPING, max_new_tokens=96, repetition_penalty=1.0)  # greedy, but stopped once it repeats
    assert engine.last.ended_by == "repetition" and engine.last.answer_tokens < 60

    default = engine.answer(LOOPING, max_new_tokens=96)
    assert engine.last.ended_by == "eos" and default.count(line) <= 1, default
