"""Batch-1 prefill, then greedy decoding in a loop we own.

Hot-path contract (engine, attention, cache, ragged): the engine runs every forward over a kvbench cache inside a
session it opens (`attention.compression` for the prefill, then `session.observe()` for a method's extra passes;
`attention.decoding` for the question and decoding steps) and so declares each forward's `Phase`; it creates the
cache (`new_cache`), reads its sizes and trims it back after a question (`restore_cache`), and never touches layer
tensors or calls the attention wrapper's internals. The wrapper (attention.py) dispatches on the declared phase,
the cache (cache.py) and its ragged layers (ragged.py) hold the tokens.

Owning the loop (rather than `model.generate`) gives the methods control of the cache and of positions: the
prompt is prefilled once at positions 0..n-1 while the method compresses each layer, and every new token gets
its true position n + step, whatever number of tokens the cache holds. For FullKV it produces exactly the
tokens of `model.generate(do_sample=False)` (tested), on hybrid models too: the cache mirrors the model's layer
types (cache.py) and decoding respects each layer's window (attention.py). The cache goes to the model under the
argument name the installed transformers uses (`cache.cache_kwargs`).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch

from kvbench.attention import Phase, Session, compression, decoding, decoding_batch
from kvbench.batching import BatchedCache, fork_cache, fork_method
from kvbench.cache import CompressedCache, cache_kwargs
from kvbench.decoding import (DecodeSchedule, KvPeak, head_peak, restore, schedule_for, session_refusal,
                              session_schedule, snapshot)
from kvbench.errors import KvbenchError
from kvbench.methods import FullKV, Method
from kvbench.query import check_agnostic_model
from kvbench.requests import Request, Turn
from kvbench.sessions import check_session_answers


@dataclass
class GenerationOutput:
    token_ids: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    kv_bytes: int  # bytes of keys and values held after prefill
    layer_kept: list[int]  # tokens per head each layer holds after prefill
    stopped: str  # "stop_token" or "max_new_tokens"
    method_record: dict = field(default_factory=dict)  # what the method chose (e.g. DynamicKV's allocations)
    compressed: bool = False  # a method replaced at least one layer by a selection of its tokens
    layer_types: list[str] | None = None  # per layer, "full" or "sliding:W"/"chunked:W", on hybrid models only
    # Query-agnostic runs only (None otherwise): the compressed context's length, the question forward's time,
    # and whether the compressed context came from an earlier sample (prefill_s is then 0: nothing was prefilled).
    context_tokens: int | None = None
    question_prefill_s: float | None = None
    context_reused: bool | None = None
    # The most tokens any head held and the most KV bytes held, over every state after a forward (and, with a
    # decode schedule, just before each cut); cuts: decoding-time compressions done (None: prefill only).
    peak_kv_tokens: int = 0
    peak_kv_bytes: int = 0
    decode_cuts: int | None = None
    turns: "list[TurnOutput] | None" = None  # a multi-turn session: one output per turn (token_ids: all of them)

    @property
    def kv_tokens(self) -> int:
        return sum(self.layer_kept)

    def log_fields(self) -> dict:
        """The per-sample fields every benchmark writes to its prediction lines."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "kv_tokens": self.kv_tokens,
            "kv_bytes": self.kv_bytes,
            "layer_kept": self.layer_kept,
            "compressed": self.compressed,
            **({"layer_types": self.layer_types} if self.layer_types else {}),
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "new_tokens": len(self.token_ids),
            "peak_kv_tokens": self.peak_kv_tokens,
            "peak_kv_bytes": self.peak_kv_bytes,
            **({"decode_cuts": self.decode_cuts} if self.decode_cuts is not None else {}),
            "stopped": self.stopped,
            **({"method": self.method_record} if self.method_record else {}),
            **({"query": "agnostic", "context_part_tokens": self.context_tokens,
                "question_tokens": self.prompt_tokens - self.context_tokens,
                "question_prefill_s": round(self.question_prefill_s, 4), "context_reused": self.context_reused}
               if self.context_tokens is not None else {}),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def num_layers_of(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return config.num_hidden_layers


def new_cache(model, method: Method) -> CompressedCache:
    """A cache that mirrors `model`'s layer types, compressed as `method.local_layers` says."""
    return CompressedCache.for_model(model.config, method.local_layers)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: some models' generation_config (Qwen2: 1.05) applies it
    even under greedy decoding, and the papers' numbers include it."""
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


@dataclass
class Prefilled:
    """The state right after a prefill: the (compressed) cache and the logits of the last prompt token."""
    cache: CompressedCache
    logits: torch.Tensor  # [1, vocab] float32
    prompt_tokens: int
    prefill_s: float


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, method: Method | None = None) -> Prefilled:
    """Run the prompt `input_ids` [1, n] at positions 0..n-1 while `method` compresses each layer (timed)."""
    method = method or FullKV()
    device = input_ids.device
    n = input_ids.shape[1]
    cache = new_cache(model, method)
    method.begin(n, len(cache.compressed_layers))  # layer schedules run over the compressed layers
    if not cache.compressed_layers and not method.keeps_all(n):
        raise KvbenchError(
            f"{method.name} has no layer to compress: every layer of this model attends within a local window "
            f"({cache.kinds[0].short()}), and method.local_layers=keep leaves those as the model defines them. "
            f"Set method.local_layers=compress to compress them too, or use method=fullkv"
        )
    held = {cache.held_at_prefill(i, n) for i in cache.compressed_layers}
    if method.equal_length_layers and len(held) > 1 and not method.keeps_all(n):
        raise KvbenchError(
            f"{method.name} compares scores across layers, but with method.local_layers=compress this model's "
            f"compressed layers hold different numbers of tokens ({sorted(held)}: local windows vs the whole "
            f"prompt). Use method.local_layers=keep (the budget then applies to the full-attention layers)"
        )
    _sync(device)
    start = time.perf_counter()
    with compression(method, cache) as session:
        out = model(input_ids=input_ids, position_ids=torch.arange(n, device=device)[None],
                    use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        session.observe()  # what runs now are the method's own passes over the filled cache (KVzip's)
        method.after_prefill(model, input_ids, cache)
    logits = out.logits[:, -1].float()
    _sync(device)
    if not method.keeps_all(n) and session.compressed_calls == 0:
        raise KvbenchError(
            f"{method.name} did not compress any layer: this model's attention does not go through transformers' "
            f"AttentionInterface (attn_implementation={model.config._attn_implementation!r}), e.g. remote code with "
            f"its own attention. Use a model class from transformers, or method=fullkv."
        )
    return Prefilled(cache, logits, n, time.perf_counter() - start)


@torch.inference_mode()
def decode_step(model, token_id: torch.Tensor, position: int, cache: CompressedCache,
                schedule: DecodeSchedule | None = None) -> torch.Tensor:
    """One decoding step: token `token_id` [1, 1] at its true `position`; returns the next logits [1, vocab].
    With a `schedule` (method.decode_interval) this step may cut every compressed layer back to its budget."""
    with decoding(cache, schedule):
        if schedule is not None:
            schedule.begin_forward(position, 1)
        out = model(input_ids=token_id, position_ids=torch.tensor([[position]], device=token_id.device),
                    use_cache=True, **cache_kwargs(model, cache))
        if schedule is not None:
            schedule.end_forward(cache)
    return out.logits[:, -1].float()


def check_interval(method: Method, max_new_tokens: int, key: str = "max_new_tokens") -> None:
    """A decode schedule must be able to cut: its interval at most the tokens generated (`key` names the cap in the
    message: the engine's argument, or the benchmark setting the pipeline checks before the model loads)."""
    interval = method.decode_interval
    if interval and interval > max_new_tokens:
        raise KvbenchError(f"method.decode_interval={interval} is above {key}={max_new_tokens}: no "
                           f"decoding-time compression would ever run; lower method.decode_interval")


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, method: Method | None = None, *, max_new_tokens: int,
             stop_token_ids: Sequence[int] = (), min_new_tokens: int = 0,
             repetition_penalty: float = 1.0, question_ids: torch.Tensor | None = None,
             contexts: "ContextCache | None" = None) -> GenerationOutput:
    """Greedy generation for one prompt `input_ids` [1, n] with `method` compressing the cache at prefill.

    With `question_ids` [1, q] the run is query-agnostic: `input_ids` is the context alone, compressed before the
    question is seen (see `generate_agnostic`; `contexts` reuses a compressed context across samples)."""
    if question_ids is not None:
        return generate_agnostic(model, input_ids, question_ids, method, max_new_tokens=max_new_tokens,
                                 stop_token_ids=stop_token_ids, min_new_tokens=min_new_tokens,
                                 repetition_penalty=repetition_penalty, contexts=contexts)
    method = method or FullKV()
    check_interval(method, max_new_tokens)
    state = prefill(model, input_ids, method)
    n, cache, prefill_s = state.prompt_tokens, state.cache, state.prefill_s
    kv_bytes, layer_kept = cache.nbytes(), cache.tokens_per_head()
    schedule = schedule_for(method, model)
    peak = schedule.peak if schedule is not None else KvPeak()
    peak.observe(cache)
    tokens, stopped, decode_s = greedy_decode(model, state.logits, cache, input_ids, n, max_new_tokens=max_new_tokens,
                                              stop_token_ids=stop_token_ids, min_new_tokens=min_new_tokens,
                                              repetition_penalty=repetition_penalty, schedule=schedule)
    peak.observe(cache)  # prefill-only: the cache only grew since the prefill
    return GenerationOutput(tokens, n, prefill_s, decode_s, kv_bytes, layer_kept, stopped, method.record(),
                            cache.any_compressed(), layer_types(cache), peak_kv_tokens=peak.tokens,
                            peak_kv_bytes=peak.bytes, decode_cuts=schedule.cuts if schedule is not None else None)


def layer_types(cache: CompressedCache) -> list[str] | None:
    """Each layer's attention type for the prediction lines of hybrid models (None on all-global models)."""
    return [kind.short() for kind in cache.kinds] if cache.hybrid else None


@torch.inference_mode()
def greedy_decode(model, logits: torch.Tensor, cache: CompressedCache, seen: torch.Tensor, position: int, *,
                  max_new_tokens: int, stop_token_ids: Sequence[int] = (), min_new_tokens: int = 0,
                  repetition_penalty: float = 1.0, schedule: DecodeSchedule | None = None,
                  forced: Sequence[int] | None = None) -> tuple[list[int], str, float]:
    """Greedy decoding from the logits of the last prompt token; the first new token goes to `position` (the true
    position after the whole prompt). `seen` [1, n] is the prompt (for the repetition penalty).
    `forced`: replay these tokens (a resumed session's recorded answer) through the same forwards, checking that
    greedy decoding picks each of them. Returns (tokens, "stop_token" | "max_new_tokens", seconds)."""
    device = logits.device
    stop = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    tokens: list[int] = []
    stopped = "max_new_tokens"
    start = time.perf_counter()
    for step in range(max_new_tokens):
        if repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        if step < min_new_tokens and len(stop):
            logits[:, stop] = float("-inf")
        next_id = logits.argmax(dim=-1, keepdim=True)
        if forced is not None:
            if step == len(forced) or int(next_id) != forced[step]:
                raise KvbenchError(f"a resumed session's recorded answer does not reproduce (token {step}: greedy "
                                   f"decoding now picks {int(next_id)}, the record holds "
                                   f"{forced[step] if step < len(forced) else 'no more tokens'}); the earlier "
                                   f"turns ran with other settings or hardware: rerun into a new output_dir")
            next_id = torch.tensor([[forced[step]]], device=device)
        tokens.append(int(next_id))
        if len(stop) and bool((stop == next_id).any()):
            stopped = "stop_token"
            break
        if step == max_new_tokens - 1 or (forced is not None and step == len(forced) - 1):
            break
        seen = torch.cat([seen, next_id], dim=1) if repetition_penalty != 1.0 else seen
        logits = decode_step(model, next_id, position + step, cache, schedule)
    _sync(device)
    return tokens, stopped, time.perf_counter() - start


# ---- query-agnostic generation: compress the context, then ask (many) questions -----------------------------------
@dataclass
class CompressedContext:
    """A prefilled, compressed context ready for questions: `lengths` are the tokens each layer holds after
    compression, the state every answer returns the cache to."""
    context_ids: torch.Tensor  # [1, C]
    prefilled: Prefilled
    lengths: list[int]
    kv_bytes: int
    record: dict  # what the method chose at this prefill
    layer_kept: list[float]  # tokens per head each layer holds after compression (a mean over heads when ragged)


def cache_lengths(cache: CompressedCache) -> list[int]:
    return [layer.get_seq_length() for layer in cache.layers]


def restore_cache(cache: CompressedCache, lengths: Sequence[int]) -> None:
    """Trim what was appended after compression (question and answer tokens) from every layer, through the
    layer's own `crop(-tokens)` (transformers' layer API; any layer type that can drop its newest tokens works).
    No copy and no re-prefill: each layer keeps a view of its first `lengths[i]` tokens."""
    for layer, keep in zip(cache.layers, lengths):
        extra = layer.get_seq_length() - keep
        if extra < 0:
            raise RuntimeError(f"cache layer holds {layer.get_seq_length()} tokens, fewer than its {keep} "
                               f"post-compression tokens: it was modified outside restore_cache")
        if extra:
            layer.crop(-extra)


def compress_context(model, context_ids: torch.Tensor, method: Method | None = None) -> CompressedContext:
    """Prefill the context alone at positions 0..C-1 while `method` compresses it (the question is not known)."""
    method = method or FullKV()
    check_agnostic_model(model.config)
    state = prefill(model, context_ids, method)
    cache = state.cache
    return CompressedContext(context_ids, state, cache_lengths(cache), cache.nbytes(), method.record(),
                             cache.tokens_per_head())


@torch.inference_mode()
def question_forward(model, question_ids: torch.Tensor, position: int, cache: CompressedCache,
                     schedule: DecodeSchedule | None = None, cut: bool = False) -> torch.Tensor:
    """All question tokens [1, q] in one forward, uncompressed, at their true positions position..position+q-1
    (position = the uncompressed context length); returns the logits of the last one [1, vocab]. With a
    `schedule` the question chunk is one step of it (as kvpress), which may cut every compressed layer (`cut`:
    it does, a session's turn boundary)."""
    q = question_ids.shape[1]
    positions = torch.arange(position, position + q, device=question_ids.device)[None]
    with decoding(cache, schedule, Phase.QUESTION):
        if schedule is not None:
            schedule.begin_forward(position, q, cut=cut)
        out = model(input_ids=question_ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                    **cache_kwargs(model, cache))
        if schedule is not None:
            schedule.end_forward(cache)
    return out.logits[:, -1].float()


@torch.inference_mode()
def answer_question(model, context: CompressedContext, question_ids: torch.Tensor, *, max_new_tokens: int,
                    stop_token_ids: Sequence[int] = (), min_new_tokens: int = 0, repetition_penalty: float = 1.0,
                    reused: bool = False, method: Method | None = None) -> GenerationOutput:
    """Feed the question over the compressed context, decode greedily, then trim the cache back to its
    post-compression state (so the next question sees exactly the compressed context)."""
    if question_ids.shape[1] < 1:
        raise KvbenchError("query-agnostic generation needs at least one question token (the question part of the "
                           "prompt is empty)")
    state, device = context.prefilled, question_ids.device
    c, q = state.prompt_tokens, question_ids.shape[1]
    # Decoding-time compression cuts the context too: the layers are put back as they were after the answer.
    schedule = schedule_for(method, model) if method is not None else None
    saved = snapshot(state.cache, method) if schedule is not None else None
    peak = schedule.peak if schedule is not None else KvPeak()
    peak.observe(state.cache)
    try:
        _sync(device)
        start = time.perf_counter()
        logits = question_forward(model, question_ids, c, state.cache, schedule)
        _sync(device)
        question_s = time.perf_counter() - start
        seen = torch.cat([context.context_ids, question_ids], dim=1)
        tokens, stopped, decode_s = greedy_decode(
            model, logits, state.cache, seen, c + q, max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids, min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
            schedule=schedule)
        peak.observe(state.cache)
    finally:
        if saved is not None:
            restore(state.cache, method, saved)
        else:
            restore_cache(state.cache, context.lengths)
    cache = state.cache
    return GenerationOutput(tokens, c + q, 0.0 if reused else state.prefill_s, decode_s,
                            context.kv_bytes, list(context.layer_kept), stopped, dict(context.record),
                            cache.any_compressed(), layer_types(cache), context_tokens=c,
                            question_prefill_s=question_s, context_reused=reused, peak_kv_tokens=peak.tokens,
                            peak_kv_bytes=peak.bytes, decode_cuts=schedule.cuts if schedule is not None else None)


class ContextCache:
    """Compress once, ask many: keeps the last compressed context; a sample whose context token ids (and model and
    method) are identical is answered from it without prefilling again. Runners put samples sharing a context next
    to each other. Counts the prefills done and avoided, and the prefill seconds saved."""

    def __init__(self) -> None:
        self.current: CompressedContext | None = None
        self._owner: tuple | None = None  # (model, method) objects the cached context was compressed with
        self.prefills = 0
        self.reuses = 0
        self.prefill_s_avoided = 0.0

    def get(self, model, context_ids: torch.Tensor, method: Method) -> tuple[CompressedContext, bool]:
        owner = (model, method)
        current = self.current
        if (current is not None and self._owner is not None and self._owner[0] is model
                and self._owner[1] is method and current.context_ids.shape == context_ids.shape
                and torch.equal(current.context_ids, context_ids)):
            self.reuses += 1
            self.prefill_s_avoided += current.prefilled.prefill_s
            return current, True
        self.current = None  # free the previous cache before building the next
        self.current, self._owner = compress_context(model, context_ids, method), owner
        self.prefills += 1
        return self.current, False

    def stats(self) -> dict:
        return {"context_prefills": self.prefills, "context_prefills_avoided": self.reuses,
                "context_prefill_s_avoided": round(self.prefill_s_avoided, 3)}


@torch.inference_mode()
def generate_agnostic(model, context_ids: torch.Tensor, question_ids: torch.Tensor, method: Method | None = None, *,
                      max_new_tokens: int, stop_token_ids: Sequence[int] = (), min_new_tokens: int = 0,
                      repetition_penalty: float = 1.0, contexts: ContextCache | None = None) -> GenerationOutput:
    """Query-agnostic generation: compress `context_ids` [1, C] (or reuse it from `contexts`), then answer
    `question_ids` [1, q] at positions C.. and decode. FullKV gives the tokens of `generate` on context+question."""
    method = method or FullKV()
    check_interval(method, max_new_tokens)
    if contexts is not None:
        context, reused = contexts.get(model, context_ids, method)
    else:
        context, reused = compress_context(model, context_ids, method), False
    return answer_question(model, context, question_ids, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                           min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty, reused=reused,
                           method=method)


# ---- multi-turn sessions: one context, then K questions in one conversation -------------------------------------
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


def cache_device(model) -> torch.device:
    return next(model.parameters()).device


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
            _sync(device)
            start = time.perf_counter()
            logits = chunk_forward(model, turn.question_ids, position, cache, schedule)
            _sync(device)
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


def _session(model, request: Request, method: Method, device, repetition_penalty: float, on_turn) -> GenerationOutput:
    """A session request's answer (generate_session), its turns reported to `on_turn(request, i, TurnOutput)`."""
    hook = None if on_turn is None else (lambda i, out: on_turn(request, i, out))
    return generate_session(model, torch.tensor([request.input_ids], device=device), request.turns, method,
                            max_new_tokens=request.max_new_tokens, answers=request.session_answers,
                            stop_token_ids=request.stop_token_ids, min_new_tokens=request.min_new_tokens,
                            repetition_penalty=repetition_penalty, answered=request.answered, on_turn=hook)


# ---- many requests: batched decoding with continuous batching (kvbench.batching) ----------------------------------
AUTO = "auto"
AUTO_MAX = {"cpu": 16, "cuda": 64}  # batch_size=auto never goes above (CPU: the gain flattens well before)


def check_batch_size(value) -> int | str:
    """`batch_size`: a positive integer or `auto` (one-line error otherwise)."""
    if value == AUTO:
        return AUTO
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("+").isdigit() or int(text) < 1:
        raise KvbenchError(f"batch_size={value!r}: expected a positive integer (samples decoded together) or "
                           f"batch_size=auto (picked from free memory and the longest prompt)")
    return int(text)


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process may still take: free GPU memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def auto_batch_size(model, method: Method, longest: int, free_bytes: int) -> tuple[int, dict]:
    """N for batch_size=auto: the sequences whose uncompressed KV cache (longest prompt + its new tokens, every
    stored head: `per_query_head` layouts store one row per query head) fits in half the free memory after one
    batch-1 prefill of the longest prompt (its KV cache and MLP activations). Returns (N, the reasons)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    dtype_bytes = next(model.parameters()).element_size()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    stored = heads if getattr(method, "cache_heads", None) == "per_query_head" else kv_heads
    per_token = 2 * config.num_hidden_layers * stored * head_dim * dtype_bytes
    per_sequence = per_token * longest
    prefill = per_token * longest + 4 * longest * getattr(config, "intermediate_size", 4 * config.hidden_size) * 4
    device = next(model.parameters()).device
    cap = AUTO_MAX["cuda" if device.type == "cuda" else "cpu"]
    n = max(1, min(cap, (free_bytes // 2 - prefill) // max(per_sequence, 1)))
    return int(n), {"batch_size": int(n), "free_bytes": int(free_bytes), "longest_tokens": int(longest),
                    "kv_bytes_per_sequence": int(per_sequence), "cap": cap}


@dataclass
class _Live:
    """One request being decoded: its own cache, logits, position, stop rule, schedule and tokens so far."""
    request: Request
    cache: CompressedCache
    logits: torch.Tensor  # [1, vocab] of the last token fed
    seen: torch.Tensor  # [1, n] prompt and tokens so far (repetition penalty)
    position: int  # true position of the next token fed
    stop: torch.Tensor
    schedule: DecodeSchedule | None
    peak: KvPeak
    finish: "object"  # (tokens, stopped, decode_s) -> GenerationOutput
    tokens: list[int] = field(default_factory=list)
    next_id: torch.Tensor | None = None
    stopped: str = "max_new_tokens"
    decode_s: float = 0.0


def _start(model, request: Request, method: Method, device, repetition_penalty: float,
           contexts: "ContextCache | None", record_kept: bool) -> _Live:
    """Everything a sample does alone before its first decoded token (the code paths of `generate` and
    `answer_question`): prefill and compression, or the (reused) compressed context and the question forward."""
    check_interval(method, request.max_new_tokens)
    stop = torch.tensor(sorted(set(request.stop_token_ids)), dtype=torch.long, device=device)
    ids = torch.tensor([request.input_ids], device=device)
    scheduled = bool(getattr(method, "decode_interval", None))
    if request.question_ids is None:
        state = prefill(model, ids, method)
        cache, n = state.cache, state.prompt_tokens
        kv_bytes, layer_kept = cache.nbytes(), cache.tokens_per_head()
        decoder = fork_method(method) if scheduled else method
        record = None if scheduled else copy.deepcopy(method.record())
        schedule = schedule_for(decoder, model, record_kept=record_kept)
        peak = schedule.peak if schedule is not None else KvPeak()
        peak.observe(cache)
        kept = cache.kept_positions() if record_kept else None

        def finish(tokens, stopped, decode_s):
            peak.observe(cache)
            out = GenerationOutput(tokens, n, state.prefill_s, decode_s, kv_bytes, layer_kept, stopped,
                                   decoder.record() if record is None else record, cache.any_compressed(),
                                   layer_types(cache), peak_kv_tokens=peak.tokens, peak_kv_bytes=peak.bytes,
                                   decode_cuts=schedule.cuts if schedule is not None else None)
            out.kept_positions = {"prefill": kept, "final": cache.kept_positions()} if record_kept else None
            return out
        return _Live(request, cache, state.logits, ids, n, stop, schedule, peak, finish)
    question = torch.tensor([request.question_ids], device=device)
    if question.shape[1] < 1:
        raise KvbenchError("query-agnostic generation needs at least one question token (the question part of the "
                           "prompt is empty)")
    if contexts is not None:
        context, reused = contexts.get(model, ids, method)
    else:
        context, reused = compress_context(model, ids, method), False
    state = context.prefilled
    cache = fork_cache(state.cache)  # this question's own layers: the context stays compressed for the next one
    decoder = fork_method(method) if scheduled else None
    schedule = schedule_for(decoder, model, record_kept=record_kept) if scheduled else None
    peak = schedule.peak if schedule is not None else KvPeak()
    peak.observe(cache)
    c, q = state.prompt_tokens, question.shape[1]
    kept = state.cache.kept_positions() if record_kept else None
    _sync(device)
    begin = time.perf_counter()
    logits = question_forward(model, question, c, cache, schedule)
    _sync(device)
    question_s = time.perf_counter() - begin

    def finish(tokens, stopped, decode_s):
        peak.observe(cache)
        out = GenerationOutput(tokens, c + q, 0.0 if reused else state.prefill_s, decode_s, context.kv_bytes,
                               list(context.layer_kept), stopped, dict(context.record), cache.any_compressed(),
                               layer_types(cache), context_tokens=c, question_prefill_s=question_s,
                               context_reused=reused, peak_kv_tokens=peak.tokens, peak_kv_bytes=peak.bytes,
                               decode_cuts=schedule.cuts if schedule is not None else None)
        out.kept_positions = {"prefill": kept, "final": cache.kept_positions()} if record_kept else None
        return out
    return _Live(request, cache, logits, torch.cat([ids, question], dim=1), c + q, stop, schedule, peak, finish)


def _choose(seq: _Live, repetition_penalty: float) -> bool:
    """Pick `seq`'s next token from its logits (greedy_decode's rule); True when the sequence is finished."""
    step, request, logits = len(seq.tokens), seq.request, seq.logits
    if step >= request.max_new_tokens:
        return True
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seq.seen, repetition_penalty)
    if step < request.min_new_tokens and len(seq.stop):
        logits[:, seq.stop] = float("-inf")
    next_id = logits.argmax(dim=-1, keepdim=True)
    seq.tokens.append(int(next_id))
    if len(seq.stop) and bool((seq.stop == next_id).any()):
        seq.stopped = "stop_token"
        return True
    if step == request.max_new_tokens - 1:
        return True
    if repetition_penalty != 1.0:
        seq.seen = torch.cat([seq.seen, next_id], dim=1)
    seq.next_id = next_id
    return False


def _step(model, live: list[_Live]) -> None:
    """One decoding forward for every live sequence, each token at its own true position."""
    if len(live) == 1:  # alone: exactly the batch-1 step
        seq = live[0]
        seq.logits = decode_step(model, seq.next_id, seq.position, seq.cache, seq.schedule)
        seq.position += 1
        return
    device = live[0].next_id.device
    ids = torch.cat([seq.next_id for seq in live])
    positions = torch.tensor([[seq.position] for seq in live], device=device)
    for seq in live:
        if seq.schedule is not None:
            seq.schedule.begin_forward(seq.position, 1)
    batch = BatchedCache([seq.cache for seq in live])
    sessions = [Session(seq.cache, Phase.DECODE, schedule=seq.schedule) for seq in live]
    with decoding_batch(batch, sessions):
        out = model(input_ids=ids, position_ids=positions, use_cache=True, **cache_kwargs(model, batch))
    logits = out.logits[:, -1].float()
    for b, seq in enumerate(live):
        if seq.schedule is not None:
            seq.schedule.end_forward(seq.cache)
        seq.logits, seq.position = logits[b:b + 1], seq.position + 1


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err)))


@torch.inference_mode()
def generate_requests(model, requests: Iterable[Request], method: Method | None = None, *,
                      repetition_penalty: float = 1.0, contexts: ContextCache | None = None,
                      batch_size: int | str = 1, report: dict | None = None, record_kept: bool = False,
                      on_turn=None) -> Iterator[tuple[Request, GenerationOutput]]:
    """Answer every request, yielding (request, output) as each finishes (completion order).

    Up to `batch_size` requests decode together (continuous batching: a finished sequence leaves the batch and the
    next request is prefilled into its slot); each is prefilled and compressed alone and decodes with its own
    positions, stop tokens, `min_new_tokens`, repetition penalty and decode schedule (kvbench.batching).
    `batch_size="auto"` picks N from free memory and the longest prompt (the requests are read first); `report`,
    if given, receives the choice. `record_kept` adds each output's kept positions (`kept_positions`: after the
    prefill and at the end) for the tests. A session request (`turns`) runs alone through `generate_session`, its
    turns in order (sessions are not batched); `on_turn(request, i, TurnOutput)` sees each turn as it ends."""
    method = method or FullKV()
    size = check_batch_size(batch_size)
    device = next(model.parameters()).device
    if size == AUTO:
        requests = list(requests)
        longest = max((len(r.input_ids) + len(r.question_ids or ()) + r.max_new_tokens for r in requests), default=1)
        size, why = auto_batch_size(model, method, longest, free_memory_bytes(device))
        if report is not None:
            report.update({"batch_size": size, "batch_size_auto": why})
    elif report is not None:
        report["batch_size"] = size
    if size == 1 and not record_kept:  # batch 1: each request through `generate`, the reference path
        for request in requests:
            if request.turns is not None:
                yield request, _session(model, request, method, device, repetition_penalty, on_turn)
                continue
            question = None if request.question_ids is None else torch.tensor([request.question_ids], device=device)
            yield request, generate(model, torch.tensor([request.input_ids], device=device), method,
                                    max_new_tokens=request.max_new_tokens, stop_token_ids=request.stop_token_ids,
                                    min_new_tokens=request.min_new_tokens, repetition_penalty=repetition_penalty,
                                    question_ids=question, contexts=contexts)
        return
    pending = iter(requests)
    live: list[_Live] = []
    more = True
    while live or more:
        while more and len(live) < size:
            request = next(pending, None)
            if request is None:
                more = False
                break
            if request.turns is not None:
                yield request, _session(model, request, method, device, repetition_penalty, on_turn)
                continue
            seq = _start(model, request, method, device, repetition_penalty, contexts, record_kept)
            if _choose(seq, repetition_penalty):  # done at its first token (a stop token, or one token asked)
                yield request, seq.finish(seq.tokens, seq.stopped, 0.0)
            else:
                live.append(seq)
        if not live:
            continue
        _sync(device)
        begin = time.perf_counter()
        try:
            _step(model, live)
        except Exception as err:
            if len(live) > 1 and _is_oom(err):
                raise KvbenchError(f"out of memory decoding {len(live)} samples at once (batch_size={batch_size}"
                                   f"{f', chosen {size}' if batch_size == AUTO else ''}): lower batch_size") from None
            raise
        finished = [seq for seq in live if _choose(seq, repetition_penalty)]
        _sync(device)
        spent = time.perf_counter() - begin
        for seq in live:
            seq.decode_s += spent  # a batched step's wall time counts for every sequence in it
        for seq in finished:
            live.remove(seq)
            yield seq.request, seq.finish(seq.tokens, seq.stopped, seq.decode_s)
