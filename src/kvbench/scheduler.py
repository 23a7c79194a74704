"""Many requests at once: `generate_requests`, the engine's one entry for a stream of samples (the pipeline calls
it), with continuous batching. Each request is prefilled and compressed alone (the engine's batch-1 code paths);
the live sequences decode together, one model forward per step over their own caches (`kvbench.batching`); a
finished sequence leaves the batch and the next request is prefilled into its slot. A session request runs alone
through `multiturn.generate_session`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from kvbench.attention import Phase, Session, decoding_batch
from kvbench.batching import BatchedCache, fork_cache, fork_method
from kvbench.cache import CompressedCache, cache_kwargs
from kvbench.decoding import DecodeSchedule, KvPeak, schedule_for
from kvbench.engine import (ContextCache, GenerationOutput, sync, apply_repetition_penalty, check_interval,
                            compress_context, decode_step, generate, layer_types, prefill, question_forward)
from kvbench.errors import KvbenchError
from kvbench.methods import FullKV, Method
from kvbench.multiturn import generate_session
from kvbench.requests import Request


def _session(model, request: Request, method: Method, device, repetition_penalty: float, on_turn) -> GenerationOutput:
    """A session request's answer (generate_session), its turns reported to `on_turn(request, i, TurnOutput)`."""
    hook = None if on_turn is None else (lambda i, out: on_turn(request, i, out))
    return generate_session(model, torch.tensor([request.input_ids], device=device), request.turns, method,
                            max_new_tokens=request.max_new_tokens, answers=request.session_answers,
                            stop_token_ids=request.stop_token_ids, min_new_tokens=request.min_new_tokens,
                            repetition_penalty=repetition_penalty, answered=request.answered, on_turn=hook)


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
    sync(device)
    begin = time.perf_counter()
    logits = question_forward(model, question, c, cache, schedule)
    sync(device)
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
        sync(device)
        begin = time.perf_counter()
        try:
            _step(model, live)
        except Exception as err:
            if len(live) > 1 and _is_oom(err):
                raise KvbenchError(f"out of memory decoding {len(live)} samples at once (batch_size={batch_size}"
                                   f"{f', chosen {size}' if batch_size == AUTO else ''}): lower batch_size") from None
            raise
        finished = [seq for seq in live if _choose(seq, repetition_penalty)]
        sync(device)
        spent = time.perf_counter() - begin
        for seq in live:
            seq.decode_s += spent  # a batched step's wall time counts for every sequence in it
        for seq in finished:
            live.remove(seq)
            yield seq.request, seq.finish(seq.tokens, seq.stopped, seq.decode_s)
