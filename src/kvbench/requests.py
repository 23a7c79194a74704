"""What a benchmark asks the engine for: one sample's generation.

The pipeline turns each sample a benchmark yields into a `Request` and hands a stream of them to
`scheduler.generate_requests`, which answers each with a `GenerationOutput` (in completion order, with the request it
answers), one at a time or batched. Nothing in a request refers back to the benchmark: `key` is the caller's own
handle for the sample, handed back untouched.

A multi-turn session (`turns`) is one request: `input_ids` is the shared context (compressed first), then each
turn's question is asked in the same conversation, the previous turn's answer kept in the cache (the gold one, or
the model's own: `session_answers`); the output carries one `TurnOutput` per turn (`GenerationOutput.turns`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


SESSION_ANSWERS = ("gold", "model")  # what a session keeps as each turn's answer: the reference one (SCBench), the model's


@dataclass(frozen=True)
class Turn:
    """One question of a session, as token ids of the conversation it belongs to."""
    question_ids: tuple[int, ...]  # what follows the previous answer up to the answer (e.g. user turn + assistant header)
    answer_ids: tuple[int, ...]  # the gold answer as the conversation holds it, its end-of-turn marker included
    close_ids: tuple[int, ...]  # the end-of-turn marker put after an answer of the model's own (session_answers=model)


@dataclass(frozen=True)
class Request:
    input_ids: list[int]  # the whole prompt; with `question_ids`, the context alone (compressed before the question)
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    question_ids: list[int] | None = None  # query-agnostic runs: the question, prefilled after the compression
    key: Any = field(default=None, compare=False)  # the caller's handle for this sample
    # A multi-turn session: `input_ids` is the shared context; `answered` holds the answers (token ids) already
    # recorded for its first turns, replayed, not generated again, when a killed session resumes.
    turns: tuple[Turn, ...] | None = None
    session_answers: str = "gold"
    answered: tuple[tuple[int, ...], ...] = ()

    def positions(self) -> int:
        """The most positions this request can reach: the prompt (and question) plus `max_new_tokens`; for a
        session, the context plus every turn's question and the longer of its kept answer and a full generation."""
        if self.turns is None:
            return len(self.input_ids) + len(self.question_ids or ()) + self.max_new_tokens
        kept = (lambda t: len(t.answer_ids)) if self.session_answers == "gold" else \
            (lambda t: self.max_new_tokens + len(t.close_ids))
        return len(self.input_ids) + sum(len(t.question_ids) + max(kept(t), self.max_new_tokens) for t in self.turns)
