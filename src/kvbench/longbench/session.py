"""LongBench sessions (`benchmark.session=true`): the samples of a task that share a context (same context text,
e.g. multifieldqa_zh) asked in turn in one conversation, in the order of the data file (kvbench.sessions).

Turn 1 is the sample's own query-agnostic prompt (context | question, `build_split_prompt`). A later turn asks the
template's question part with its own input: under the model's chat template (tasks that use it) as a new user
message; in raw prompts appended after the previous answer's line. The gold answer is the sample's first reference
answer. Pieces after turn 1 are tokenised on their own (their concatenation is the conversation's ids).
"""
from __future__ import annotations

from typing import Any, Sequence

from kvbench.longbench.protocol import Protocol, _tokenize, build_split_prompt, split_template
from kvbench.longbench.tasks import task_spec
from kvbench.requests import Turn
from kvbench.sessions import chat_pieces


def context_groups(examples: Sequence[dict]) -> list[list[dict]]:
    """Samples with the same context text, in first-seen order (each group one session; a group of one is a
    one-turn session)."""
    groups: dict[str, list[dict]] = {}
    for example in examples:
        groups.setdefault(example["context"], []).append(example)
    return list(groups.values())


def session_ids(task: str, group: Sequence[dict], tokenizer: Any, protocol: Protocol,
                max_input_len: int | None) -> tuple[list[int], tuple[Turn, ...]]:
    """(context ids, turns) of one group's session."""
    split, _ = build_split_prompt(task, group[0], tokenizer, protocol, max_input_len)
    _, question_template = split_template(task)
    chat = protocol.chat_template == "model" and task_spec(task).chat
    close, header, suffix = chat_pieces(tokenizer) if chat else ("\n", "", "")
    encode = lambda text: tuple(_tokenize(tokenizer, text, False))  # noqa: E731
    turns = []
    for i, example in enumerate(group):
        answer = str(example["answers"][0]) if example.get("answers") else ""
        if i == 0:
            question = tuple(split.question_ids)
        else:
            question = encode(header + question_template.format(**example).lstrip("\n") + suffix)
        turns.append(Turn(question, encode(answer + close), encode(close)))
    return list(split.context_ids), tuple(turns)
