"""Query-aware vs query-agnostic evaluation: the setting, and splitting a rendered prompt into context and question.

`aware` (the 2024 papers): the whole prompt, question included, is prefilled and compressed. `agnostic` (kvpress,
AdaKV, KVzip, SCBench): the context part is prefilled and compressed before the question is known; the question part
(question, end of the user turn, assistant header, answer prefix) is fed afterwards, uncompressed, at its true
positions. The split never re-tokenises pieces on their own: the aware prompt is rendered and tokenised exactly as in
aware mode, and cut at the token where the question text starts, so context + question == the aware prompt's ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from kvbench.errors import KvbenchError

QUERY_MODES = ("aware", "agnostic")


def check_agnostic_model(config) -> None:
    """Refuse query-agnostic runs on models with sliding-window or chunked layers (from the model's config, so the
    pipeline can refuse before the weights load)."""
    from kvbench.cache import layer_kinds

    if any(kind.local for kind in layer_kinds(config)):
        raise KvbenchError("benchmark.query=agnostic does not support models with sliding-window or chunked layers "
                           "yet (their cache cannot be trimmed back after a question once the window is full); use "
                           "benchmark.query=aware on this model")


def check_query_mode(value) -> str:
    if value not in QUERY_MODES:
        raise KvbenchError(f"benchmark.query={value!r}: choose aware (the question is compressed with the context, "
                           f"the papers' protocol) or agnostic (the context is compressed before the question)")
    return value


@dataclass(frozen=True)
class SplitPrompt:
    """One prompt cut into the part compressed before the question is known and the part fed after it."""

    context_ids: list[int]
    question_ids: list[int]
    info: dict = field(default_factory=dict)  # how the split was made (recorded with the prediction)

    @property
    def input_ids(self) -> list[int]:
        return self.context_ids + self.question_ids


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_ids(full_ids: Sequence[int], context_ids: Sequence[int], what: str) -> SplitPrompt:
    """Cut `full_ids` (the aware prompt) after the longest prefix it shares with `context_ids` (the text before the
    question, tokenised alone). A token that merges across the boundary goes to the question part, so the context
    part is always an exact prefix of the aware prompt."""
    k = common_prefix_len(full_ids, context_ids)
    if k == 0 or k == len(full_ids):
        raise KvbenchError(f"cannot split the {what} prompt into context and question (context part of {k} of "
                           f"{len(full_ids)} tokens); the question text was not found where the template puts it")
    return SplitPrompt(list(full_ids[:k]), list(full_ids[k:]), {"boundary_shift": len(context_ids) - k})


def question_start(rendered: str, question_text: str, what: str) -> int:
    """Character index where `question_text` (the last part of the user message) starts in the rendered prompt.
    Chat templates may trim the message's trailing whitespace, so the match ignores it."""
    core = question_text.rstrip()
    pos = rendered.rfind(core) if core else -1
    if pos < 0:
        raise KvbenchError(f"the {what} question text was not found in the rendered prompt, so the prompt cannot be "
                           f"split for benchmark.query=agnostic (does the chat template rewrite the message?)")
    return pos
