"""What a benchmark asks the engine for: one sample's generation.

The pipeline turns each sample a benchmark yields into a `Request` and hands a stream of them to
`engine.generate_requests`, which answers each with a `GenerationOutput` (in completion order, with the request it
answers), one at a time or batched. Nothing in a request refers back to the benchmark: `key` is the caller's own
handle for the sample, handed back untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    input_ids: list[int]  # the whole prompt; with `question_ids`, the context alone (compressed before the question)
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    question_ids: list[int] | None = None  # query-agnostic runs: the question, prefilled after the compression
    key: Any = field(default=None, compare=False)  # the caller's handle for this sample
