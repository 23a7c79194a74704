"""RULER sessions (`benchmark.session=true`): the needles of one multi-key or multi-query sample asked one per turn
in one conversation over its haystack (kvbench.sessions; the engine runs them).

Turn order: niah_multiquery asks its keys in the order of the sample's question; the niah_multikey tasks ask the
sample's own key first, then the other needles of the haystack (distractors) in the order they appear, up to
`TURNS` turns. Each turn asks RULER's singular question about one key ("What is the special magic number for K
mentioned in the provided text?") with its answer prefix; the gold answer is the key's value.
"""
from __future__ import annotations

import re

from kvbench.errors import KvbenchError
from kvbench.ruler.constants import FAMILIES, NEEDLE, TASKS
from kvbench.sessions import Conversation, chat_follow_up, session_turns

SESSION_TASKS = ("niah_multikey_1", "niah_multikey_2", "niah_multikey_3", "niah_multiquery")
TURNS = 4
TURN_ORDER = ("multiquery: the question's key order; multikey: the sample's key, then the other needles in context "
              "order")


def needles_of(context: str, kind: str) -> list[tuple[str, str]]:
    """(key, value) of every needle sentence in a haystack, in order."""
    pattern = re.escape(NEEDLE).replace(re.escape("{type_needle_v}"), re.escape(kind)) \
        .replace(re.escape("{key}"), r"(.+?)").replace(re.escape("{value}"), r"(\S+?)")
    return re.findall(pattern, context)


def session_keys(task: str, sample: dict) -> list[tuple[str, str]]:
    """The (key, value) asked at each turn of `sample`'s session."""
    kind = TASKS[task]["args"]["type_needle_v"]
    needles = needles_of(sample["context"], kind)
    by_value = {value: key for key, value in needles}
    missing = [v for v in sample["outputs"] if v not in by_value]
    if missing:
        raise KvbenchError(f"RULER {task} sample {sample['index']}: its answers are not in needle sentences of its "
                           f"haystack, so its session cannot be built")
    asked = [(by_value[v], v) for v in sample["outputs"]]
    if task != "niah_multiquery":
        asked += [n for n in needles if n[0] != asked[0][0]][:TURNS - 1]
    return asked[:TURNS]


def session_ids(task: str, sample: dict, tokenizer, template) -> tuple[list[int], tuple]:
    """(context ids, turns) of a generated RULER sample's session, rendered as the sample itself is (chat: the
    model's template, the first user message being the sample's own text; base: plain text)."""
    if sample.get("source") == "kvpress":
        raise KvbenchError("RULER sessions need generated samples (the haystack's needle sentences); drop "
                           "benchmark.data_dir")
    family = FAMILIES["niah"]
    kind = TASKS[task]["args"]["type_needle_v"]
    singular = kind[:-1]
    question = family["template"].split("{context}")[1].replace("What are all", "What is") \
        .replace("{type_needle_v}", singular)
    prefix = family["answer_prefix"].replace("{type_needle_v}", singular).replace(" are", " is")
    if template.name == "chat":
        close, header = chat_follow_up(tokenizer)
    else:
        close, header = "\n", ""
    asked = session_keys(task, sample)
    prefixes, answers = [], []
    for i, (key, value) in enumerate(asked):
        ask = question.format(query=key)
        start = sample["context"] + ask.lstrip("\n") if i == 0 else prefixes[-1] + header + ask.lstrip("\n")
        prefixes.append(start + template.suffix + prefix.format(query=key))
        answers.append(f"{value}.")
        prefixes.append(f"{prefixes[-1]} {value}.{close}")
    conversation = Conversation(prefixes, len(sample["context"]), answers)
    return session_turns(tokenizer, conversation, add_special_tokens=template.name == "base")
