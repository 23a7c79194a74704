"""Many requests at once: `generate_requests`, the engine's one entry for a stream of samples (the pipeline calls
it), with continuous batching. The requests that fill free slots together are prefilled in one packed forward
(`engine.prefill_packed`, up to `prefill_pack_tokens` prompt tokens; query-agnostic: their contexts, then each
question asked over its own), in which each prompt attends and is compressed exactly as alone; a request whose
context is already compressed (ask-many) starts alone from it. The live sequences decode together, one model
forward per step over their own caches (`kvbench.batching`); a finished sequence leaves the batch and the next
requests are prefilled into the free slots. A session request runs alone through `multiturn.generate_session`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch

from kvbench.attention import Phase, Session, decoding_batch
from kvbench.batching import BatchedCache, fork_method
from kvbench.cache import cache_kwargs
from kvbench.engine import (ContextCache, GenerationOutput, Started, ask, cache_device, check_interval,
                            compress_context, decode_step, generate, next_token, prefill_packed, start, stop_reason,
                            sync, text_config)
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
# prefill_pack_tokens=auto: the most prompt tokens prefilled together in one packed forward. On a GPU packing fills
# the device for short prompts; on this project's CPU it gains for short prompts only (SmolLM2, one thread: 16 x 128
# tokens 1.19-1.24x, 4 x 512 0.94-1.03x, 8 x 512 0.83-0.87x: the larger activations leave the caches).
PACK_TOKENS = {"cpu": 2048, "cuda": 8192}


def _count(value) -> int | None:
    """`value` as a whole number >= 0 (an int or its text, `+` allowed), or None (a bool, a fraction, text)."""
    text = str(value).strip()
    return None if isinstance(value, bool) or not text.lstrip("+").isdigit() else int(text)


def check_pack_tokens(value, device: torch.device) -> int:
    """`prefill_pack_tokens`: an integer >= 0 (0: every prompt prefilled alone) or `auto` (PACK_TOKENS)."""
    if value == AUTO:
        return PACK_TOKENS["cuda" if device.type == "cuda" else "cpu"]
    tokens = _count(value)
    if tokens is None:
        raise KvbenchError(f"prefill_pack_tokens={value!r}: expected an integer >= 0 (the most prompt tokens "
                           f"prefilled together; 0: each prompt alone) or auto")
    return tokens


def check_batch_size(value) -> int | str:
    """`batch_size`: a positive integer or `auto` (one-line error otherwise)."""
    if value == AUTO:
        return AUTO
    size = _count(value)
    if size is None or size < 1:
        raise KvbenchError(f"batch_size={value!r}: expected a positive integer (samples decoded together) or "
                           f"batch_size=auto (picked from free memory and the longest prompt)")
    return size


def free_memory_bytes(device: torch.device) -> int:
    """Memory this process may still take: free GPU memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def auto_batch_size(model, method: Method, longest: int, free_bytes: int, pack_tokens: int = 0) -> tuple[int, dict]:
    """N for batch_size=auto: the sequences whose uncompressed KV cache (longest prompt + its new tokens, every
    stored head: `per_query_head` layouts store one row per query head) fits in half the free memory after one
    prefill forward of the longest prompt or of `pack_tokens` packed prompt tokens, whichever is longer (its KV
    cache and MLP activations). Returns (N, the reasons)."""
    config = text_config(model)
    dtype_bytes = next(model.parameters()).element_size()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    stored = heads if getattr(method, "cache_heads", None) == "per_query_head" else kv_heads
    per_token = 2 * config.num_hidden_layers * stored * head_dim * dtype_bytes
    per_sequence = per_token * longest
    forward = max(longest, pack_tokens)
    prefill = per_token * forward + 4 * forward * getattr(config, "intermediate_size", 4 * config.hidden_size) * 4
    device = cache_device(model)
    cap = AUTO_MAX["cuda" if device.type == "cuda" else "cpu"]
    n = max(1, min(cap, (free_bytes // 2 - prefill) // max(per_sequence, 1)))
    return int(n), {"batch_size": int(n), "free_bytes": int(free_bytes), "longest_tokens": int(longest),
                    "kv_bytes_per_sequence": int(per_sequence), "cap": cap}


@dataclass
class _Live:
    """One request being decoded: where it started (its cache, logits, position and schedule, which move on as it
    decodes), its stop rule and its tokens so far."""
    request: Request
    state: Started
    stop: torch.Tensor
    tokens: list[int] = field(default_factory=list)
    next_id: torch.Tensor | None = None
    stopped: str = "max_new_tokens"
    decode_s: float = 0.0

    def finish(self) -> GenerationOutput:
        return self.state.finish(self.tokens, self.stopped, self.decode_s)


def _prompt(request: Request, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids [1, n], question_ids [1, q] or None) of `request` on `device`."""
    question = None if request.question_ids is None else torch.tensor([request.question_ids], device=device)
    return torch.tensor([request.input_ids], device=device), question


def _start(model, request: Request, method: Method, device, contexts: ContextCache | None,
           record_kept: bool) -> _Live:
    """`request` prefilled (or its question asked) alone, by the engine's own start, ready to decode in a batch."""
    ids, question = _prompt(request, device)
    state = start(model, ids, method, max_new_tokens=request.max_new_tokens, question_ids=question,
                  contexts=contexts, own=True, record_kept=record_kept)
    return _live(request, state, device)


def _live(request: Request, state: Started, device) -> _Live:
    """`request`, started as `state`, ready to decode with its stop tokens."""
    return _Live(request, state, torch.tensor(sorted(set(request.stop_token_ids)), dtype=torch.long, device=device))


def _packable(request: Request, group: list[Request], model, method: Method, contexts: ContextCache | None) -> bool:
    """Whether `request` can join `group` in one packed prefill forward: its start is one prefill of its prompt
    (query-aware) or of its context (query-agnostic: a context not already compressed, and not the one of the
    request before it, which the ask-many reuse answers from that one's compressed context); not a session."""
    if request.turns is not None:
        return False
    if request.question_ids is None:
        return True
    if contexts is None or not request.question_ids:  # (an empty question: `start` says why it is refused)
        return False
    if group and group[-1].input_ids == request.input_ids:
        return False
    return not contexts.holds(model, torch.tensor([request.input_ids], device=cache_device(model)), method)


def _start_packed(model, group: list[Request], method: Method, device, contexts: ContextCache | None,
                  record_kept: bool) -> list[_Live]:
    """The requests of `group` (`_packable`) prefilled together in one packed forward (engine.prefill_packed), each
    compressed by its own copy of `method` as alone, then (query-agnostic) its question asked over its compressed
    context, the last context kept in `contexts` for the samples after it; ready to decode in a batch."""
    for request in group:
        check_interval(method, request.max_new_tokens)
    prompts = [_prompt(request, device) for request in group]
    methods = [fork_method(method) for _ in group]
    states = prefill_packed(model, [ids for ids, _ in prompts], methods)
    started = []
    for request, (ids, question), own, state in zip(group, prompts, methods, states):
        if question is None:
            begun = start(model, ids, own, max_new_tokens=request.max_new_tokens, own=True, record_kept=record_kept,
                          prefilled=state)
        else:
            context = compress_context(model, ids, own, prefilled=state)
            contexts.put(model, method, context)
            begun = ask(model, context, question, own, record_kept=record_kept)
        started.append(_live(request, begun, device))
    return started


def _choose(seq: _Live, repetition_penalty: float) -> bool:
    """Pick `seq`'s next token from its logits (greedy_decode's rule); True when the sequence is finished."""
    step, request, state = len(seq.tokens), seq.request, seq.state
    if step >= request.max_new_tokens:
        return True
    next_id = next_token(state.logits, state.seen, seq.stop, step, request.min_new_tokens, repetition_penalty)
    seq.tokens.append(int(next_id))
    ended = stop_reason(next_id, seq.stop, step, request.max_new_tokens)
    if ended:
        seq.stopped = ended
        return True
    if repetition_penalty != 1.0:
        state.seen = torch.cat([state.seen, next_id], dim=1)
    seq.next_id = next_id
    return False


def _step(model, live: list[_Live]) -> None:
    """One decoding forward for every live sequence, each token at its own true position."""
    states = [seq.state for seq in live]
    if len(live) == 1:  # alone: exactly the batch-1 step
        state = states[0]
        state.logits = decode_step(model, live[0].next_id, state.position, state.cache, state.schedule)
        state.position += 1
        return
    ids = torch.cat([seq.next_id for seq in live])
    positions = torch.tensor([[state.position] for state in states], device=ids.device)
    for state in states:
        if state.schedule is not None:
            state.schedule.begin_forward(state.position, 1)
    batch = BatchedCache([state.cache for state in states])
    sessions = [Session(state.cache, Phase.DECODE, schedule=state.schedule) for state in states]
    with decoding_batch(batch, sessions):
        out = model(input_ids=ids, position_ids=positions, use_cache=True, **cache_kwargs(model, batch))
    logits = out.logits[:, -1].float()
    for b, state in enumerate(states):
        if state.schedule is not None:
            state.schedule.end_forward(state.cache)
        state.logits, state.position = logits[b:b + 1], state.position + 1


def _is_oom(err: BaseException) -> bool:
    """An out-of-memory error: CUDA's (torch.OutOfMemoryError) or the CPU allocator's (a RuntimeError)."""
    text = str(err) if isinstance(err, RuntimeError) else ""
    return isinstance(err, torch.OutOfMemoryError) or any(
        words in text for words in ("out of memory", "not enough memory", "can't allocate memory"))


def _out_of_memory(rows: int, batch_size, size: int, backoffs: int = 0) -> KvbenchError:
    """The one-line error for an out-of-memory with `rows` samples in memory (one: nothing left to back off)."""
    chosen = f", chosen {size}" if batch_size == AUTO else ""
    chosen += f" after {backoffs} back-off{'s' if backoffs > 1 else ''}" if backoffs else ""
    if rows > 1:
        return KvbenchError(f"out of memory with {rows} samples in memory at once (batch_size={batch_size}{chosen}): "
                            f"lower batch_size")
    return KvbenchError(f"out of memory running one sample alone (batch_size={batch_size}{chosen}): it does not fit "
                        f"even at batch 1; use shorter prompts, a smaller model or a device with more memory")


@torch.inference_mode()
def generate_requests(model, requests: Iterable[Request], method: Method | None = None, *,
                      repetition_penalty: float = 1.0, contexts: ContextCache | None = None,
                      batch_size: int | str = 1, report: dict | None = None, record_kept: bool = False,
                      on_turn=None, prefill_pack_tokens: int | str = AUTO
                      ) -> Iterator[tuple[Request, GenerationOutput]]:
    """Answer every request, yielding (request, output) as each finishes (completion order).

    Up to `batch_size` requests decode together (continuous batching: a finished sequence leaves the batch and the
    requests are prefilled into the free slots); each is compressed as alone and decodes with its own positions,
    stop tokens, `min_new_tokens`, repetition penalty and decode schedule (kvbench.batching). Requests that fill
    free slots together share one packed prefill forward (agnostic: of their contexts) of up to
    `prefill_pack_tokens` prompt tokens (0: each prefilled alone; one longer prompt goes alone; `auto`:
    PACK_TOKENS); `report` counts those forwards.
    `batch_size="auto"` picks N from free memory and the longest prompt (the requests are read first) and backs
    off when memory runs out with several samples in memory: N becomes half of them, and the unfinished requests
    (nothing of them was yielded) go back to the front of the queue and start again. `report`, if given, receives
    the size applied (auto: the choice, its inputs and the back-offs). Out of memory with a fixed `batch_size`, or
    with one sample alone, is a one-line error. `record_kept` adds each output's kept positions (`kept_positions`:
    after the prefill and at the end) for the tests. A session request (`turns`) runs alone through
    `generate_session`, its turns in order (sessions are not batched); `on_turn(request, i, TurnOutput)` sees each
    turn as it ends."""
    method = method or FullKV()
    size = check_batch_size(batch_size)
    device = cache_device(model)
    prefill_pack_tokens = check_pack_tokens(prefill_pack_tokens, device)
    report = {} if report is None else report
    if size == AUTO:
        requests = list(requests)
        longest = max((r.positions() for r in requests), default=1)  # a session: its whole conversation
        size, why = auto_batch_size(model, method, longest, free_memory_bytes(device), prefill_pack_tokens)
        report.update({"batch_size": size, "batch_size_auto": why, "batch_size_backoffs": 0})
    else:
        report["batch_size"] = size
    if size != 1 or record_kept:
        report.update({"prefill_pack_tokens": prefill_pack_tokens, "packed_prefills": 0, "packed_prompts": 0})
    if size == 1 and not record_kept:  # batch 1: each request through `generate`, the reference path
        for request in requests:
            if request.turns is not None:
                yield request, _session(model, request, method, device, repetition_penalty, on_turn)
                continue
            ids, question = _prompt(request, device)
            try:
                out = generate(model, ids, method, max_new_tokens=request.max_new_tokens,
                               stop_token_ids=request.stop_token_ids, min_new_tokens=request.min_new_tokens,
                               repetition_penalty=repetition_penalty, question_ids=question, contexts=contexts)
            except Exception as err:
                if _is_oom(err):
                    raise _out_of_memory(1, batch_size, size) from None
                raise
            yield request, out
        return
    pending = iter(requests)
    again: list[Request] = []  # the unfinished requests of a batch that backed off, before the rest
    live: list[_Live] = []
    more = True
    while live or again or more:
        admitting, session = [], False  # requests being prefilled (or a session run) while `live` holds others
        try:
            while len(live) < size:
                request = again.pop(0) if again else next(pending, None)
                if request is None:
                    more = False
                    break
                if request.turns is not None:  # never started again: its turns are reported as they end
                    session = True
                    out = _session(model, request, method, device, repetition_penalty, on_turn)
                    session = False
                    yield request, out
                    continue
                admitting = [request]
                tokens = len(request.input_ids)
                packable = _packable(request, [], model, method, contexts)
                while packable and len(live) + len(admitting) < size:  # more prompts for the same forward
                    other = again.pop(0) if again else next(pending, None)
                    if other is None:
                        break
                    if (not _packable(other, admitting, model, method, contexts)
                            or tokens + len(other.input_ids) > prefill_pack_tokens):
                        again.insert(0, other)
                        break
                    admitting.append(other)
                    tokens += len(other.input_ids)
                if len(admitting) > 1:
                    started = _start_packed(model, admitting, method, device, contexts, record_kept)
                    report["packed_prefills"] += 1
                    report["packed_prompts"] += len(admitting)
                else:
                    started = [_start(model, request, method, device, contexts, record_kept)]
                admitting = []
                for seq in started:
                    if _choose(seq, repetition_penalty):  # done at its first token (a stop token, or one token asked)
                        yield seq.request, seq.finish()
                    else:
                        live.append(seq)
            if not live:
                continue
            sync(device)
            begin = time.perf_counter()
            _step(model, live)
        except Exception as err:
            if not _is_oom(err):
                raise
            rows = len(live) + len(admitting) + session
            if batch_size != AUTO or rows == 1 or session:
                raise _out_of_memory(rows, batch_size, size, report.get("batch_size_backoffs", 0)) from None
        else:
            finished = [seq for seq in live if _choose(seq, repetition_penalty)]
            sync(device)
            spent = time.perf_counter() - begin
            for seq in live:
                seq.decode_s += spent  # a batched step's wall time counts for every sequence in it
            for seq in finished:
                live.remove(seq)
                yield seq.request, seq.finish()
            continue
        # batch_size=auto backs off: half as many samples at once, the unfinished ones started again
        again[:0] = [seq.request for seq in live] + admitting
        live.clear()
        seq = None
        size = max(1, rows // 2)
        report.update({"batch_size": size, "batch_size_backoffs": report["batch_size_backoffs"] + 1})
        if device.type == "cuda":
            torch.cuda.empty_cache()
