"""Multi-turn sessions (`benchmark.session=true`): one shared context prefilled alone and compressed, then K
questions asked in turn in one conversation at true positions, each turn's answer kept in the cache and every
compressed layer cut back to its budget at each turn boundary. The benchmark side (rendering a conversation,
cutting its ids into turns, per-turn scores) is `kvbench.sessions`; the forwards are the engine's (`kvbench.engine`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from kvbench.cache import CompressedCache
from kvbench.decoding import DecodeSchedule, KvPeak, head_peak, restore, session_refusal, session_schedule, snapshot
from kvbench.engine import (GenerationOutput, sync, cache_device, check_interval, compress_context, greedy_decode,
                            layer_types, question_forward)
from kvbench.errors import KvbenchError
from kvbench.methods import FullKV, Method
from kvbench.requests import Turn
from kvbench.sessions import check_session_answers


@dataclass
class TurnOutput:
    """One turn of a session. `position`: the true position of the turn's first question token."""
    token_ids: list[int]
    stopped: str
    position: int
    question_tokens: int
    answer_tokens: int  # the tokens this turn's answer adds to the cache (gold, or the model's own + close)
    question_s: float
    decode_s: float
    peak_kv_tokens: int  # the most tokens any head held during this turn (question, answer and the boundary)
    peak_kv_bytes: int
    kv_tokens_after: int | None  # the most tokens any head holds after the cut at this turn's end (None: last turn)
    replayed: bool = False  # a resumed session: this turn's recorded answer was replayed, not generated
    context_tokens: int = 0  # the shared context's length (uncompressed)
    kv_bytes: int = 0  # bytes of keys and values held after the context's compression

    def log_fields(self) -> dict:
        return {"prompt_tokens": self.position + self.question_tokens, "context_part_tokens": self.context_tokens,
                "kv_bytes": self.kv_bytes, "turn_position": self.position, "question_tokens": self.question_tokens,
                "answer_tokens": self.answer_tokens, "question_prefill_s": round(self.question_s, 4),
                "decode_s": round(self.decode_s, 4), "new_tokens": len(self.token_ids), "stopped": self.stopped,
                "peak_kv_tokens": self.peak_kv_tokens, "peak_kv_bytes": self.peak_kv_bytes,
                **({"kv_tokens_after_turn": self.kv_tokens_after} if self.kv_tokens_after is not None else {})}


def check_session(method: Method, answers: str) -> None:
    """What a session needs of its settings (the pipeline calls it before the model loads)."""
    check_session_answers(answers)
    reason = session_refusal(method)
    if reason:
        raise KvbenchError(f"method {method.name} cannot compress at a session's turn boundaries: {reason}; use "
                           f"another method or drop benchmark.session")


@torch.inference_mode()
def chunk_forward(model, ids: Sequence[int], position: int, cache: CompressedCache,
                  schedule: DecodeSchedule | None, cut: bool = False) -> torch.Tensor:
    """Feed `ids` in one forward at their true positions as one step of `schedule` (`cut`: ending with a cut back
    to the budget, a turn boundary); returns the last token's logits [1, vocab]."""
    return question_forward(model, torch.tensor([list(ids)], device=cache_device(model)), position, cache, schedule,
                            cut)


@torch.inference_mode()
def generate_session(model, context_ids: torch.Tensor, turns: Sequence[Turn], method: Method | None = None, *,
                     max_new_tokens: int, answers: str = "gold", stop_token_ids: Sequence[int] = (),
                     min_new_tokens: int = 0, repetition_penalty: float = 1.0,
                     answered: Sequence[Sequence[int]] = (), on_turn=None) -> GenerationOutput:
    """A multi-turn session: `context_ids` [1, C] is prefilled alone and compressed (query-agnostic), then each
    turn's question is fed in one forward and answered greedily, in one conversation at true positions. At each
    turn's end the answer is appended (answers="gold": the turn's reference answer, the model's tokens dropped;
    "model": the model's own tokens and the turn's close) in one forward that ends with every compressed layer cut
    back to its budget; `method.decode_interval` cuts inside the turns too. The first `len(answered)` turns replay
    their recorded answers (a resumed session). `on_turn(i, TurnOutput)` is called as each turn ends."""
    method = method or FullKV()
    check_interval(method, max_new_tokens)
    check_session(method, answers)
    if not turns:
        raise KvbenchError("a session needs at least one turn")
    if answers == "model" and any(not turn.close_ids for turn in turns):
        raise KvbenchError("session_answers=model needs each turn's close (the end-of-turn tokens after an answer)")
    method.turn_cuts = True
    try:
        context = compress_context(model, context_ids, method)
        cache, device = context.prefilled.cache, context_ids.device
        schedule = session_schedule(method, model)
        session_peak = KvPeak()
        session_peak.observe(cache)
        position, seen = context.prefilled.prompt_tokens, context_ids
        outputs: list[TurnOutput] = []
        for i, turn in enumerate(turns):
            last = i == len(turns) - 1
            peak = KvPeak()
            peak.observe(cache)
            if schedule is not None:
                schedule.peak = peak
            start_position = position
            sync(device)
            start = time.perf_counter()
            logits = chunk_forward(model, turn.question_ids, position, cache, schedule)
            sync(device)
            question_s = time.perf_counter() - start
            position += len(turn.question_ids)
            if repetition_penalty != 1.0:
                seen = torch.cat([seen, torch.tensor([list(turn.question_ids)], device=device)], dim=1)
            replay = list(answered[i]) if i < len(answered) else None
            saved = None
            if answers == "gold":  # the model's answer goes to a scratch state, dropped after the turn
                saved = snapshot(cache, method), schedule.save() if schedule is not None else None
            if replay is not None and answers == "gold":  # its answer never reaches the cache: nothing to redo
                tokens, stopped, decode_s = replay, replay_stop(replay, stop_token_ids, max_new_tokens), 0.0
            else:
                tokens, stopped, decode_s = greedy_decode(
                    model, logits, cache, seen, position, max_new_tokens=max_new_tokens,
                    stop_token_ids=stop_token_ids, min_new_tokens=min_new_tokens,
                    repetition_penalty=repetition_penalty, schedule=schedule, forced=replay)
            peak.observe(cache)
            if saved is not None:
                restore(cache, method, saved[0])
                if schedule is not None:
                    schedule.load(saved[1])
                appended = list(turn.answer_ids)
            else:  # every token but the last was fed while decoding; a stop token gives way to the turn's close
                position += len(tokens) - 1
                appended = ([] if stopped == "stop_token" else tokens[-1:]) + list(turn.close_ids)
                if repetition_penalty != 1.0 and len(tokens) > 1:
                    seen = torch.cat([seen, torch.tensor([tokens[:-1]], device=device)], dim=1)
            after = None
            if not last:  # the turn boundary: the answer joins the conversation, and every layer is cut back
                chunk_forward(model, appended, position, cache, schedule, cut=True)
                position += len(appended)
                if repetition_penalty != 1.0:
                    seen = torch.cat([seen, torch.tensor([appended], device=device)], dim=1)
                peak.observe(cache)
                after = max(head_peak(layer) for layer in cache.layers)
            session_peak.observe(cache)
            session_peak.tokens, session_peak.bytes = (max(session_peak.tokens, peak.tokens),
                                                       max(session_peak.bytes, peak.bytes))
            out = TurnOutput(tokens, stopped, start_position, len(turn.question_ids), len(appended), question_s,
                             decode_s, peak.tokens, peak.bytes, after, replay is not None,
                             context.prefilled.prompt_tokens, context.kv_bytes)
            outputs.append(out)
            if on_turn is not None:
                on_turn(i, out)
    finally:
        method.turn_cuts = False
    return GenerationOutput(
        [t for out in outputs for t in out.token_ids], position, context.prefilled.prefill_s,
        sum(out.decode_s for out in outputs), context.kv_bytes, list(context.layer_kept), outputs[-1].stopped,
        dict(context.record), cache.any_compressed(), layer_types(cache),
        context_tokens=context.prefilled.prompt_tokens, question_prefill_s=sum(out.question_s for out in outputs),
        context_reused=False, peak_kv_tokens=session_peak.tokens, peak_kv_bytes=session_peak.bytes,
        decode_cuts=schedule.cuts if schedule is not None else None, turns=outputs)


def replay_stop(tokens: Sequence[int], stop_token_ids: Sequence[int], max_new_tokens: int) -> str:
    return "stop_token" if tokens and tokens[-1] in set(stop_token_ids) else "max_new_tokens"
