"""Multi-turn conversations after one document checkpoint: follow-ups see earlier turns, a new conversation is the
document alone again, and the oldest turns drop when they outgrow the room after the document."""

from __future__ import annotations

import pytest
from conftest import haystack_text

from duo_qserve.conversation import Conversation
from duo_qserve.engine import Engine

pytestmark = pytest.mark.slow
INTRODUCTION = "My name is Zorbl. Say hello to me."
FOLLOW_UP = "What is my name?"


@pytest.fixture(scope="module")
def engine():
    engine = Engine.from_pretrained("default", max_tokens=1400, pattern=None)
    engine.ingest(haystack_text(1400))
    return engine


def test_a_follow_up_sees_the_earlier_turn_and_costs_its_tokens(engine):
    conversation = Conversation()
    engine.answer(INTRODUCTION, max_new_tokens=24, conversation=conversation)
    first = conversation.turns[0]
    before = engine.prefilled_tokens
    answer = engine.answer(FOLLOW_UP, max_new_tokens=24, conversation=conversation)
    assert "Zorbl" in answer
    q_tokens = engine.last.question_tokens
    assert engine.last.history_turns == 1 and engine.last.history_tokens == len(first.ids)
    assert engine.prefilled_tokens - before == len(first.ids) + q_tokens
    assert engine.conversation_in_cache[0] == 1
    assert [t.question for t in conversation.turns] == [INTRODUCTION, FOLLOW_UP]
    assert conversation.records()[1]["answer"] == answer and "ids" not in conversation.records()[1]


def test_a_new_conversation_returns_to_the_document_alone(engine):
    alone = engine.answer(FOLLOW_UP, max_new_tokens=24)
    assert "Zorbl" not in alone
    assert engine.answer(FOLLOW_UP, max_new_tokens=24, conversation=Conversation()) == alone


def test_the_oldest_turns_drop_when_they_outgrow_the_room_and_stay_for_export(engine):
    conversation, room = Conversation(), engine.cache.max_tokens - engine.document.tokens
    long_question = haystack_text(1200, start_file=2) + "\n\nWhat is this passage about?"  # ~300 tokens
    for _ in range(5):
        engine.answer(long_question, max_new_tokens=8, conversation=conversation)
        s = engine.last
        assert s.history_tokens + s.question_tokens + 8 <= room
    assert conversation.dropped > 0 and len(conversation.turns) == 5
    assert conversation.context_start == conversation.dropped
    assert sum(t.stats["dropped_turns"] for t in conversation.turns) == conversation.dropped
    assert len(conversation.records()) == 5
