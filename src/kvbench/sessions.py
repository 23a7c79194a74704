"""Multi-turn sessions (`benchmark.session=true`): one shared context, then K questions asked in turn in one
conversation, each previous answer kept in the cache (multiturn.generate_session runs them).

The benchmark side, as small pure functions: render a conversation's prefixes (a chat template, or a benchmark's
raw format), cut its token ids into the context and each turn's question / answer / close (`session_turns`), and
summarise scores per turn (`turn_scores`). A conversation is rendered and tokenised whole, then cut where each
prefix ends (as `kvbench.query.split_ids` cuts the agnostic prompt), so the pieces concatenated are exactly the
ids of the whole conversation, and turn i's prompt is the ids of the conversation up to question i.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from kvbench.errors import KvbenchError
from kvbench.query import common_prefix_len, question_start
from kvbench.requests import SESSION_ANSWERS, Turn


@dataclass(frozen=True)
class Conversation:
    """A session's texts: `prefixes` alternate prompt and answer ends, [P1, A1, P2, A2, ..., PK, AK], each a prefix
    of the next (P_i ends where turn i's answer starts, A_i after its gold answer and end-of-turn marker);
    `context_end` is where the context part ends in P1 (the first question starts); `answers` the gold texts."""
    prefixes: list[str]
    context_end: int
    answers: list[str]


def chat_conversation(tokenizer, context: str, questions: Sequence[str], answers: Sequence[str],
                      join: str = "\n\n") -> Conversation:
    """The conversation under the model's chat template: the first user message is `context + join +
    questions[0]`, each later one a question; each assistant message the gold answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise KvbenchError("a chat session needs a tokenizer with a chat template, and this one has none; use the "
                           "benchmark's raw prompt")
    messages, prefixes = [], []
    for i, (question, answer) in enumerate(zip(questions, answers)):
        messages.append({"role": "user", "content": f"{context}{join}{question}" if i == 0 else question})
        prefixes.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        messages.append({"role": "assistant", "content": answer})
        prefixes.append(tokenizer.apply_chat_template(messages, tokenize=False))
    return Conversation(prefixes, question_start(prefixes[0], questions[0], "session"), list(answers))


_A, _B, _C = "\x00KVBENCH-A\x00", "\x00KVBENCH-B\x00", "\x00KVBENCH-C\x00"


def chat_follow_up(tokenizer) -> tuple[str, str]:
    """(close, user header) of the chat template: what it writes after an assistant message, and before a later
    user message's content (rendered around markers)."""
    close, header, _ = chat_pieces(tokenizer)
    return close, header


def chat_pieces(tokenizer) -> tuple[str, str, str]:
    """(close, user header, suffix): `chat_follow_up`, plus what follows a later user message's content up to the
    assistant's answer (the end of the user turn and the assistant header)."""
    one = tokenizer.apply_chat_template([{"role": "user", "content": _A}, {"role": "assistant", "content": _B}],
                                        tokenize=False)
    two = tokenizer.apply_chat_template([{"role": "user", "content": _A}, {"role": "assistant", "content": _B},
                                         {"role": "user", "content": _C}], add_generation_prompt=True, tokenize=False)
    if one.count(_B) != 1 or two.count(_C) != 1 or not two.startswith(one):
        raise KvbenchError("the chat template does not render a conversation as a growing text; use a base "
                           "template or drop benchmark.session")
    return one[one.index(_B) + len(_B):], two[len(one):two.index(_C)], two[two.index(_C) + len(_C):]


def session_turns(tokenizer, conversation: Conversation, add_special_tokens: bool = False,
                  ) -> tuple[list[int], tuple[Turn, ...]]:
    """(context ids, turns) of `conversation`, cut from the ids of the whole conversation."""
    texts = conversation.prefixes
    for earlier, later in zip(texts, texts[1:]):
        if not later.startswith(earlier):
            raise KvbenchError("the chat template rewrites earlier turns when a new one is added (e.g. it drops a "
                               "reasoning block), so a session cannot keep one growing cache; use another model or "
                               "drop benchmark.session")

    def encode(text: str, special: bool = add_special_tokens) -> list[int]:
        return list(tokenizer(text, add_special_tokens=special)["input_ids"])

    full = encode(texts[-1])
    cuts = [common_prefix_len(full, encode(texts[0][:conversation.context_end]))]
    for text in texts[:-1]:
        cuts.append(max(cuts[-1], common_prefix_len(full, encode(text))))
    cuts.append(len(full))
    if cuts[0] == 0:
        raise KvbenchError("cannot cut the session's context from its first question (no common token prefix)")
    turns = []
    for i, answer in enumerate(conversation.answers):
        q0, q1, a1 = cuts[2 * i], cuts[2 * i + 1], cuts[2 * i + 2]
        if q1 <= q0:
            raise KvbenchError(f"turn {i + 1} of the session has no question tokens")
        piece = texts[2 * i + 1][len(texts[2 * i]):]
        at = piece.rfind(answer.strip()) if answer.strip() else -1
        close = piece[at + len(answer.strip()):] if at >= 0 else ""
        turns.append(Turn(tuple(full[q0:q1]), tuple(full[q1:a1]), tuple(encode(close, False))))
    return full[:cuts[0]], tuple(turns)


def check_session_answers(value) -> str:
    if value not in SESSION_ANSWERS:
        raise KvbenchError(f"benchmark.session_answers={value!r}: choose gold (each turn's reference answer stays "
                           f"in the cache, as SCBench) or model (the model's own answers stay)")
    return value


def turn_scores(records: Sequence[dict], score: Callable[[dict], float | None]) -> dict:
    """{turn: {"score": mean, "n": count}} over session records (each has "turn", 1-based); turns in order."""
    by_turn: dict[int, list[float]] = {}
    for record in records:
        value = score(record)
        if value is not None:
            by_turn.setdefault(int(record["turn"]), []).append(float(value))
    return {str(t): {"score": sum(v) / len(v), "n": len(v)} for t, v in sorted(by_turn.items())}


def resume_answers(records: Sequence[dict], turns: int) -> tuple[tuple[int, ...], ...]:
    """The recorded answers of a session's first turns, in order (a resumed session replays them). Records of
    later turns without every earlier one cannot be resumed."""
    by_turn = {int(r["turn"]): tuple(r["answer_ids"]) for r in records}
    done = sorted(by_turn)
    if done != list(range(1, len(done) + 1)) or len(done) > turns:
        raise KvbenchError(f"a session's records hold turns {done}, not its first ones; delete that session's lines "
                           f"to rerun it")
    return tuple(by_turn[t] for t in done)
