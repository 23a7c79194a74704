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


def _chat_text(tokenizer, context: str, question: str = CHAT_QUESTION) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise KvbenchError(
            "Needle preset 'chat' needs a tokenizer with a chat template, and this one has none. "
            "Fix: use the 'raw' preset for base models."
        )
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _chat_prompt_ids(tokenizer, context: str, question: str = CHAT_QUESTION) -> list[int]:
    # The template writes any BOS itself, so the tokenizer must not add another.
    return _encode(tokenizer, _chat_text(tokenizer, context, question))


def build_prompt_ids(tokenizer, context_ids: list[int], preset: str = "raw", needle: int = 0) -> list[int]:
    """The model input for one cell: the decoded context wrapped in the preset's prompt.

    ``"raw"``: the papers' plain-string prompt, tokenised with special tokens (BOS if the tokenizer
    adds one). ``"chat"``: the model's chat template with one user message, the context followed by
    the question; small chat models (SmolLM2) only find the needle this way.
    """
    if preset not in PROMPT_PRESETS:
        raise KvbenchError(f"Unknown needle prompt preset {preset!r}. Fix: use one of {PROMPT_PRESETS}.")
    _, raw_question, chat_question, _ = needle_question(needle)
    context = tokenizer.decode(list(context_ids), skip_special_tokens=True)
    if preset == "chat":
        return _chat_prompt_ids(tokenizer, context, chat_question)
    return list(tokenizer(_raw_prompt(context, raw_question))["input_ids"])


# ---- query-agnostic split and the K-needle variant -------------------------------------------------------------
RAW_QUESTION_START = " Based on the content of the book, Question: "

# Needle i of the K-needle variant (one per grid depth, asked one at a time from one compressed haystack). Needle 0
# is the papers' needle, so one needle is the standard test. Each needle declares its key facts: the words an answer
# must contain to count as retrieved (the retrieval score, `kvbench.needle.scoring.retrieval_score`).
CITY_NEEDLES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("San Francisco", "eat a sandwich and sit in Dolores Park on a sunny day.", ("sandwich", "Dolores Park")),
    ("Lisbon", "ride the old yellow tram up to the castle at sunset.", ("tram", "castle")),
    ("Kyoto", "walk through the bamboo forest early in the morning.", ("bamboo forest", "morning")),
    ("Chicago", "take an architecture boat tour along the river.", ("architecture", "boat tour")),
    ("Cairo", "watch the sun rise over the pyramids of Giza.", ("pyramids", "Giza")),
    ("Buenos Aires", "dance the tango in a small club in San Telmo.", ("tango", "San Telmo")),
    ("Reykjavik", "soak in a hot spring under the northern lights.", ("hot spring", "northern lights")),
    ("Istanbul", "drink black tea on a ferry across the Bosphorus.", ("ferry", "Bosphorus")),
    ("Sydney", "swim in the ocean pool at Bondi Beach in winter.", ("ocean pool", "Bondi Beach")),
    ("Montreal", "eat warm bagels from a wood oven on Saint-Viateur Street.", ("bagels", "Saint-Viateur")),
)
KEY_FACTS = CITY_NEEDLES[0][2]  # the papers' needle: "sandwich" and "Dolores Park"


def needle_question(i: int) -> tuple[str, str, str, str]:
    """(needle text, raw-prompt question, chat-prompt question, expected answer) of needle ``i``."""
    if not 0 <= i < len(CITY_NEEDLES):
        raise KvbenchError(f"the K-needle variant has {len(CITY_NEEDLES)} distinct needles; use at most "
                           f"{len(CITY_NEEDLES)} depths (benchmark.grid.depths)")
    if i == 0:
        return NEEDLE, RETRIEVAL_QUESTION, CHAT_QUESTION, EXPECTED_ANSWER
    city, answer, _ = CITY_NEEDLES[i]
    return (f"\nThe best thing to do in {city} is {answer}\n", f"The best thing to do in {city} is: ",
            f"Based on the text above, what is the best thing to do in {city}?", answer)


def needle_facts(i: int) -> tuple[str, ...]:
    """The key facts of needle ``i``: a response retrieves the needle when it contains all of them."""
    needle_question(i)  # the range check
    return CITY_NEEDLES[i][2]


def build_multi_context_ids(tokenizer, haystack_ids: list[int], context_length: int, depths: list[int],
                            buffer: int = FINAL_CONTEXT_LENGTH_BUFFER) -> tuple[list[int], list[int]]:
    """One haystack holding needle i at depth ``depths[i]`` (each moved back to a sentence start as in
    ``build_context_ids``); returns the ids and the index where each needle starts. The haystack is cut so that
    haystack + all needles fit ``context_length - buffer``."""
    needles = [_encode(tokenizer, needle_question(i)[0]) for i in range(len(depths))]
    total = sum(len(n) for n in needles)
    _validate_cell(context_length, 0, total, buffer)
    for depth in depths:
        _validate_cell(context_length, depth, total, buffer)
    if len(haystack_ids) > context_length:
        context = _encode(tokenizer, tokenizer.decode(list(haystack_ids[:context_length]), skip_special_tokens=True))
    else:
        context = list(haystack_ids)
    context = context[: context_length - buffer - total]
    periods = period_token_ids(tokenizer)
    spots = [len(context) if d == 100 else _sentence_start_before(context, int(len(context) * d / 100), periods)
             for d in depths]
    order = sorted(range(len(depths)), key=lambda i: (spots[i], i))
    out, starts, last = [], [0] * len(depths), 0
    for i in order:
        out += context[last:spots[i]]
        starts[i] = len(out)
        out += needles[i]
        last = spots[i]
    return out + context[last:], starts


def build_split_prompt_ids(tokenizer, context_ids: list[int], preset: str = "raw", needle: int = 0):
    """The prompt of ``build_prompt_ids`` (asking about needle ``needle``), cut after the haystack into the context
    part (compressed before the question is known) and the question part. ``"raw"``: the context part ends with
    ``</book>.\n``; ``"chat"``: with the haystack and the ``\n\n`` before the question, the question part holds
    the question, the end of the user turn and the assistant header. context + question ids == the aware ids."""
    from kvbench.query import question_start, split_ids

    if preset not in PROMPT_PRESETS:
        raise KvbenchError(f"Unknown needle prompt preset {preset!r}. Fix: use one of {PROMPT_PRESETS}.")
    _, raw_question, chat_question, _ = needle_question(needle)
    context = tokenizer.decode(list(context_ids), skip_special_tokens=True)
    if preset == "chat":
        text = _chat_text(tokenizer, context, chat_question)  # rendered once, cut where the question starts
        full = _encode(tokenizer, text)
        prefix = _encode(tokenizer, text[: question_start(text, chat_question, "needle")])
    else:
        text = _raw_prompt(context, raw_question)
        full = list(tokenizer(text)["input_ids"])
        prefix = list(tokenizer(text[: text.rindex(RAW_QUESTION_START)])["input_ids"])
    return split_ids(full, prefix, "needle")


def build_session_ids(tokenizer, context_ids: list[int], needles: int, preset: str = "raw"):
    """A multi-needle session: the haystack `context_ids`, then one question per needle (needle i at turn i + 1) in
    one conversation, each gold answer the needle's sentence. Returns (context ids, turns) (kvbench.sessions).
    ``"chat"``: the chat template, the first user message as in ``build_prompt_ids``; ``"raw"``: the papers' prompt,
    each later question appended as `` Question: ...\nAnswer:`` after the previous answer's line."""
    from kvbench.sessions import Conversation, chat_conversation, session_turns

    if preset not in PROMPT_PRESETS:
        raise KvbenchError(f"Unknown needle prompt preset {preset!r}. Fix: use one of {PROMPT_PRESETS}.")
    asked = [needle_question(i) for i in range(needles)]
    context = tokenizer.decode(list(context_ids), skip_special_tokens=True)
    if preset == "chat":
        return session_turns(tokenizer, chat_conversation(tokenizer, context, [q[2] for q in asked],
                                                          [q[0].strip() for q in asked]))
    prefixes = []
    for i, (_, raw_question, _, expected) in enumerate(asked):
        prefixes.append(_raw_prompt(context, raw_question) if i == 0 else
                        f"{prefixes[-1]} Question: {raw_question}\nAnswer:")
        prefixes.append(f"{prefixes[-1]} {expected}\n")
    conversation = Conversation(prefixes, prefixes[0].rindex(RAW_QUESTION_START), [q[3] for q in asked])
    return session_turns(tokenizer, conversation, add_special_tokens=True)


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops at EOS or at the first newline, as in the reference."""
    newline = _encode(tokenizer, "\n")
    if not newline:
        raise KvbenchError("The tokenizer encodes '\\n' to nothing; cannot build the newline stop id.")
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if newline[-1] not in ids:
        ids.append(newline[-1])
    return ids
