"""A conversation about one loaded document: its turns, and which of them the model still sees.

The document's cache is checkpointed once; a question is asked after the document's checkpoint with the earlier
turns of its conversation replayed in between, so "new conversation" is just an empty ``Conversation`` (the
document's cache is untouched) and many conversations share one document. A turn keeps the exact tokens it put
after the document (question, chat template, the answer's own tokens), so replaying it gives the model what it
saw when it answered.

When the turns outgrow the room the cache has after the document, the oldest drop out of the context for good
(``context_start`` only moves forward) and stay in ``turns`` for the export.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Turn:
    question: str
    answer: str
    document_title: str
    document_sha256: str
    ids: list[
        int
    ]  # every token this turn puts after the document (question + template + answer + end of turn)
    stats: dict = field(default_factory=dict)  # the answer's GenerationStats
    meta: dict = field(default_factory=dict)  # what the caller keeps with the turn (e.g. the app's settings)

    def record(self) -> dict:
        """The turn for an export: everything but its token ids."""
        return {
            "question": self.question,
            "answer": self.answer,
            "document_title": self.document_title,
            "document_sha256": self.document_sha256,
            **self.stats,
            **self.meta,
        }


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    context_start: int = (
        0  # turns before this one are out of the context (dropped, or about another document)
    )
    dropped: int = 0  # turns dropped because they no longer fit after the document

    def context(self, document_sha256: str) -> list[Turn]:
        """The turns the next question follows: the last run of turns about this document, oldest dropped ones
        excluded. A conversation that moves to another document starts its context afresh there."""
        if self.turns and self.turns[-1].document_sha256 != document_sha256:
            self.context_start = len(self.turns)
        return self.turns[self.context_start :]

    def drop_oldest(self) -> None:
        self.context_start += 1
        self.dropped += 1

    def records(self) -> list[dict]:
        """Every turn, for an export (dropped ones included)."""
        return [t.record() for t in self.turns]
