"""Needle-in-a-Haystack contexts and prompts, on token ids, as the KV-compression papers build them.

Follows PyramidKV / KVCache-Factory ``run_needle_in_haystack.py`` (protocol section 10.1), with the
Dec-2024 fix applied: no special tokens are encoded into or decoded out of the haystack.
"""

from __future__ import annotations

import numpy as np

from kvbench.errors import KvbenchError

# Exactly the reference strings, leading/trailing whitespace included: they change tokenisation.
NEEDLE = "\nThe best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.\n"
RETRIEVAL_QUESTION = "The best thing to do in San Francisco is: "
EXPECTED_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day."

# Tokens held back from the context length for the prompt wrapper and the answer.
FINAL_CONTEXT_LENGTH_BUFFER = 200

CHAT_QUESTION = "Based on the text above, what is the best thing to do in San Francisco?"
PROMPT_PRESETS = ("raw", "chat")


def context_lengths(start: int, end: int, step: int) -> list[int]:
    """The grid of context lengths: ``np.arange(start, end + 1, step)`` kept within [start, end].

    The papers pass ``end`` one above the last length (e.g. 1000, 8001, 100 -> 1000 ... 8000).
    """
    if step <= 0:
        raise KvbenchError(f"Context length step must be positive, got {step}.")
    if start > end:
        raise KvbenchError(f"Context length start ({start}) is above end ({end}); swap them.")
    grid = np.arange(start, end + 1, step)
    return [int(length) for length in grid if start <= length <= end]


def depth_percents(n: int = 10) -> list[int]:
    """``n`` needle depths from 0 to 100 percent, rounded as the papers do ([0, 11, ..., 100] for 10)."""
    if n < 1:
        raise KvbenchError(f"Need at least one depth, got n={n}.")
    return [int(depth) for depth in np.round(np.linspace(0, 100, n)).astype(int)]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def period_token_ids(tokenizer) -> set[int]:
    """Ids that end a sentence: every id of ``encode('.')`` without special tokens."""
    return set(_encode(tokenizer, "."))


def _sentence_start_before(tokens: list[int], position: int, periods: set[int]) -> int:
    """Move ``position`` back until the token before it is a period (or the start is reached)."""
    while position > 0 and tokens[position - 1] not in periods:
        position -= 1
    return position


def _validate_cell(context_length: int, depth_percent: float, needle_len: int, buffer: int) -> None:
    if not 0 <= depth_percent <= 100:
        raise KvbenchError(f"depth_percent must be within 0..100, got {depth_percent}.")
    if context_length - buffer <= needle_len:
        raise KvbenchError(
            f"context_length {context_length} leaves no room for the haystack after the {buffer}-token "
            f"buffer and the {needle_len}-token needle. Fix: use context lengths above "
            f"{buffer + needle_len}."
        )


def build_context_ids(
    tokenizer,
    haystack_ids: list[int],
    context_length: int,
    depth_percent: float,
    needle: str = NEEDLE,
    buffer: int = FINAL_CONTEXT_LENGTH_BUFFER,
) -> tuple[list[int], int]:
    """Token ids of the haystack with the needle inserted, and the index where the needle starts.

    Steps (protocol 10.1, 1-3): cut the haystack to ``context_length`` tokens, decode it and encode
    it again (the reference works on the decoded string); cut it to ``context_length - buffer``
    tokens including the needle; put the needle at ``depth_percent`` of the haystack, moved back to
    just after a period token. Depth 100 appends the needle at the very end.
    """
    needle_ids = _encode(tokenizer, needle)
    _validate_cell(context_length, depth_percent, len(needle_ids), buffer)
    if len(haystack_ids) > context_length:
        text = tokenizer.decode(list(haystack_ids[:context_length]), skip_special_tokens=True)
        context = _encode(tokenizer, text)
    else:
        context = list(haystack_ids)
    room = context_length - buffer
    if len(context) + len(needle_ids) > room:
        context = context[: room - len(needle_ids)]
    if depth_percent == 100:
        return context + needle_ids, len(context)
    position = int(len(context) * depth_percent / 100)
    position = _sentence_start_before(context, position, period_token_ids(tokenizer))
    return context[:position] + needle_ids + context[position:], position


def _raw_prompt(context: str, question: str) -> str:
    # The papers' string, byte for byte (the stray spaces and "<|im_start|>" included).
    return (
        f"<|im_start|> This is a very long story book: <book> {context} </book>.\n"
        f" Based on the content of the book, Question: {question}\nAnswer:"
    )


def _chat_prompt_ids(tokenizer, context: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise KvbenchError(
            "Needle preset 'chat' needs a tokenizer with a chat template, and this one has none. "
            "Fix: use the 'raw' preset for base models."
        )
    messages = [{"role": "user", "content": f"{context}\n\n{CHAT_QUESTION}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes any BOS itself, so the tokenizer must not add another.
    return _encode(tokenizer, text)


def build_prompt_ids(tokenizer, context_ids: list[int], preset: str = "raw") -> list[int]:
    """The model input for one cell: the decoded context wrapped in the preset's prompt.

    ``"raw"``: the papers' plain-string prompt, tokenised with special tokens (BOS if the tokenizer
    adds one). ``"chat"``: the model's chat template with one user message, the context followed by
    the question; small chat models (SmolLM2) only find the needle this way.
    """
    if preset not in PROMPT_PRESETS:
        raise KvbenchError(f"Unknown needle prompt preset {preset!r}. Fix: use one of {PROMPT_PRESETS}.")
    context = tokenizer.decode(list(context_ids), skip_special_tokens=True)
    if preset == "chat":
        return _chat_prompt_ids(tokenizer, context)
    return list(tokenizer(_raw_prompt(context, RETRIEVAL_QUESTION))["input_ids"])


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at EOS or at the first newline, as in the reference."""
    newline = _encode(tokenizer, "\n")
    if not newline:
        raise KvbenchError("The tokenizer encodes '\\n' to nothing; cannot build the newline stop id.")
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if newline[-1] not in ids:
        ids.append(newline[-1])
    return ids
