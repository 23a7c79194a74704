"""The model template around RULER's task template, and the split of a prompt into context | question | prefix.

RULER wraps the task template in a hard-coded model template (`scripts/data/template.py`) and appends the task's
answer prefix AFTER it, so the prefix opens the assistant turn (`prepare.py`: `model_template.format(task_template=
...) + answer_prefix`). kvbench offers:
- `base`: RULER's `base` template, the bare task text (what kvpress's RULER data was generated with);
- `chat`: the model's own chat template with the task text as the one user message, rendered once around a marker
  and split there. RULER's `meta-llama3` template is exactly this for Llama-3 (no system block); for a template that
  injects a default system block (SmolLM2, Qwen) the block is kept, as kvpress's pipeline keeps it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.ruler.constants import QUESTION_PATTERNS

TEMPLATES = ("auto", "base", "chat")
_MARK = "\x00KVBENCH-RULER-TASK\x00"


@dataclass(frozen=True)
class ModelTemplate:
    name: str
    prefix: str = ""   # text before the task template
    suffix: str = ""   # text between the task template and the answer prefix

    def wrap(self, task_template: str, answer_prefix: str) -> str:
        """RULER's full template: model template around the task template, then the answer prefix. Braces of
        the chat text are escaped: the result is `.format`-ed by the generators."""
        esc = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
        return esc(self.prefix) + task_template + esc(self.suffix) + answer_prefix

    def record(self) -> dict:
        return {"name": self.name, "prefix": self.prefix, "suffix": self.suffix}


def model_template(tokenizer, name: str) -> ModelTemplate:
    if name not in TEMPLATES:
        raise KvbenchError(f"benchmark.template={name!r}: choose one of {', '.join(TEMPLATES)}")
    if name == "auto":
        name = "chat" if getattr(tokenizer, "chat_template", None) else "base"
    if name == "base":
        return ModelTemplate("base")
    if not getattr(tokenizer, "chat_template", None):
        raise KvbenchError("benchmark.template=chat needs a tokenizer with a chat template, and this one has none. "
                           "Fix: benchmark.template=base")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                         tokenize=False)
    if text.count(_MARK) != 1:
        raise KvbenchError("the chat template does not render the user message verbatim; use benchmark.template=base")
    prefix, suffix = text.split(_MARK)
    return ModelTemplate("chat", prefix, suffix)


def split_prompt(family: str, text: str, answer_prefix_start: int) -> tuple[str, str, str]:
    """(context, question, answer_prefix) of a full prompt. The answer prefix starts at `answer_prefix_start`
    (RULER: `rfind` of its first 10 characters); the question starts at the LAST match of kvpress's question regex
    before it (few-shot examples and repeated instructions stay in the context)."""
    head, answer_prefix = text[:answer_prefix_start], text[answer_prefix_start:]
    matches = list(re.finditer(QUESTION_PATTERNS[family], head))
    if not matches:
        raise KvbenchError(f"internal: no {family} question found in a generated prompt")
    cut = matches[-1].start()
    return head[:cut], head[cut:], answer_prefix
