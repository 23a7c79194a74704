"""Batch-1 prefill, then greedy decoding in a loop we own.

Hot-path contract (engine, attention, cache, ragged): the engine runs every forward over a kvbench cache inside a
session it opens (`attention.compression` for the prefill, then `session.observe()` for a method's extra passes;
`attention.decoding` for the question and decoding steps) and so declares each forward's `Phase`; it creates the
cache (`new_cache`), reads its sizes, forks it for a question (`batching.fork_cache`), and never touches layer
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
from typing import Callable, Sequence

import torch

from kvbench.attention import Phase, compression, decoding, observing, packed_prefill
from kvbench.batching import BatchedCache, fork_cache, fork_method
from kvbench.cache import CompressedCache, cache_kwargs
from kvbench.decoding import DecodeSchedule, KvPeak, schedule_for
from kvbench.errors import KvbenchError
from kvbench.methods import FullKV, Method
from kvbench.query import check_agnostic_model


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
    turns: list | None = None  # a multi-turn session: one multiturn.TurnOutput per turn (token_ids: all of them)
    kept_positions: dict | None = None  # record_kept only: {"prefill": ..., "final": ...} (the tests)

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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_device(model) -> torch.device:
    return next(model.parameters()).device


def text_config(model):
    """The language model's config (a multimodal model's text part)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def num_layers_of(model) -> int:
    return text_config(model).num_hidden_layers


def new_cache(model, method: Method) -> CompressedCache:
    """A cache that mirrors `model`'s layer types, compressed as `method.local_layers` says."""
    return CompressedCache.for_model(model.config, method.local_layers)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: some models' generation_config (Qwen2: 1.05) applies it
    even under greedy decoding, and the papers' numbers include it."""
    picked = logits.gather(-1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return logits.scatter(-1, seen, picked)


def next_token(logits: torch.Tensor, seen: torch.Tensor, stop: torch.Tensor, step: int, min_new_tokens: int,
               repetition_penalty: float) -> torch.Tensor:
    """The greedy pick [1, 1] from `logits` [1, vocab] at decoding step `step`: the repetition penalty over `seen`,
    and no stop token before `min_new_tokens`."""
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if step < min_new_tokens and len(stop):
        logits[:, stop] = float("-inf")
    return logits.argmax(dim=-1, keepdim=True)


def stop_reason(next_id: torch.Tensor, stop: torch.Tensor, step: int, max_new_tokens: int) -> str | None:
    """Why decoding ends with `next_id`, the token picked at step `step`: "stop_token", "max_new_tokens" (it was the
    last one allowed), or None (decoding goes on)."""
    if len(stop) and bool((stop == next_id).any()):
        return "stop_token"
    return "max_new_tokens" if step == max_new_tokens - 1 else None


@dataclass
class Prefilled:
    """The state right after a prefill: the (compressed) cache and the logits of the last prompt token."""
    cache: CompressedCache
    logits: torch.Tensor  # [1, vocab] float32
    prompt_tokens: int
    prefill_s: float


def _begin(model, method: Method, n: int) -> CompressedCache:
    """A new cache for a prompt of `n` tokens, `method` begun on it; refuses a method that cannot compress it."""
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
    return cache


def _check_compressed(model, method: Method, n: int, session) -> None:
    if not method.keeps_all(n) and session.compressed_calls == 0:
        raise KvbenchError(
            f"{method.name} did not compress any layer: this model's attention does not go through transformers' "
            f"AttentionInterface (attn_implementation={model.config._attn_implementation!r}), e.g. remote code with "
            f"its own attention. Use a model class from transformers, or method=fullkv."
        )


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, method: Method | None = None) -> Prefilled:
    """Run the prompt `input_ids` [1, n] at positions 0..n-1 while `method` compresses each layer (timed)."""
    method = method or FullKV()
    device = input_ids.device
    n = input_ids.shape[1]
    cache = _begin(model, method, n)
    sync(device)
    start = time.perf_counter()
    with compression(method, cache) as session:
        out = model(input_ids=input_ids, position_ids=torch.arange(n, device=device)[None],
                    use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        session.observe()  # what runs now are the method's own passes over the filled cache (KVzip's)
        method.after_prefill(model, input_ids, cache)
    logits = out.logits[:, -1].float()
    sync(device)
    _check_compressed(model, method, n, session)
    return Prefilled(cache, logits, n, time.perf_counter() - start)


@torch.inference_mode()
def prefill_packed(model, prompts: Sequence[torch.Tensor], methods: Sequence[Method]) -> list[Prefilled]:
    """Several prompts [1, n_b] in one packed forward ([1, sum n_b], each at its own positions 0..n_b-1), prompt b
    compressed by `methods[b]` (each its own object: `batching.fork_method`). Every layer attends and compresses
    each prompt alone (`attention.packed_prefill`), so each keeps the positions its batch-1 prefill keeps; only the
    matrix products outside attention see all the tokens at once. A method's observation passes (KVzip's) then run
    per prompt. The forward's time is shared out by prompt length (`prefill_s`)."""
    if len(prompts) == 1:
        return [prefill(model, prompts[0], methods[0])]
    device = prompts[0].device
    lengths = [ids.shape[1] for ids in prompts]
    caches = [_begin(model, method, n) for method, n in zip(methods, lengths)]
    ids = torch.cat(list(prompts), dim=1)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
    last = torch.tensor(lengths, device=device).cumsum(0) - 1  # each prompt's last token: the logits kept
    sync(device)
    start = time.perf_counter()
    packed = BatchedCache(caches, lengths)
    with packed_prefill(packed, methods) as sessions:
        out = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=last,
                    **cache_kwargs(model, packed))
        for session, method, prompt, cache in zip(sessions, methods, prompts, caches):
            with observing(session):
                method.after_prefill(model, prompt, cache)
    logits = out.logits[0].float()
    sync(device)
    spent = time.perf_counter() - start
    for method, n, session in zip(methods, lengths, sessions):
        _check_compressed(model, method, n, session)
    total = sum(lengths)
    return [Prefilled(cache, logits[b:b + 1], n, spent * n / total)
            for b, (cache, n) in enumerate(zip(caches, lengths))]


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


@dataclass
class Started:
    """A sample right before its first decoded token: what greedy decoding continues from, and `finish(tokens,
    stopped, decode_s)`, which makes its GenerationOutput once it is decoded."""
    cache: CompressedCache
    logits: torch.Tensor  # [1, vocab] of the last token fed
    seen: torch.Tensor  # [1, n] the prompt (for the repetition penalty)
    position: int  # the true position of the first new token
    schedule: DecodeSchedule | None
    finish: Callable[[list[int], str, float], GenerationOutput]


@torch.inference_mode()
def start(model, input_ids: torch.Tensor, method: Method | None = None, *, max_new_tokens: int,
          question_ids: torch.Tensor | None = None, contexts: "ContextCache | None" = None, own: bool = False,
          record_kept: bool = False, prefilled: Prefilled | None = None) -> Started:
    """Everything a sample does alone before its first decoded token: the prefill of `input_ids` [1, n] while
    `method` compresses it or, with `question_ids` [1, q] (query-agnostic), the compressed context `input_ids`
    (reused from `contexts` when identical) and the question forward (`ask`). Timed, peaks tracked.

    `own` (the scheduler, whose samples overlap): the sample's decode schedule works on its own copy of the method's
    per-sample state and its method record is taken now, so that other samples may be prefilled with `method` before
    this one is finished. `record_kept`: the output carries its kept positions (after the prefill and at the end).
    `prefilled`: the prompt's prefill already done (a packed prefill of several prompts, `prefill_packed`)."""
    method = method or FullKV()
    check_interval(method, max_new_tokens)
    if question_ids is not None:
        if question_ids.shape[1] < 1:
            raise KvbenchError("query-agnostic generation needs at least one question token (the question part of "
                               "the prompt is empty)")
        if contexts is not None:
            context, reused = contexts.get(model, input_ids, method)
        else:
            context, reused = compress_context(model, input_ids, method), False
        return ask(model, context, question_ids, method, reused=reused, record_kept=record_kept)
    state = prefilled if prefilled is not None else prefill(model, input_ids, method)
    cache = state.cache
    kv_bytes, layer_kept = cache.nbytes(), cache.tokens_per_head()
    scheduled = bool(getattr(method, "decode_interval", None))
    decoder = fork_method(method) if own and scheduled else method
    record = copy.deepcopy(method.record()) if own and not scheduled else None
    schedule = schedule_for(decoder, model, record_kept=record_kept)
    peak = schedule.peak if schedule is not None else KvPeak()
    peak.observe(cache)
    kept = cache.kept_positions() if record_kept else None

    def finish(tokens: list[int], stopped: str, decode_s: float) -> GenerationOutput:
        peak.observe(cache)  # prefill-only: the cache only grew since the prefill
        return GenerationOutput(tokens, state.prompt_tokens, state.prefill_s, decode_s, kv_bytes, layer_kept, stopped,
                                decoder.record() if record is None else record, cache.any_compressed(),
                                layer_types(cache), peak_kv_tokens=peak.tokens, peak_kv_bytes=peak.bytes,
                                decode_cuts=schedule.cuts if schedule is not None else None,
                                kept_positions=kept_record(kept, cache))
    return Started(cache, state.logits, input_ids, state.prompt_tokens, schedule, finish)


def kept_record(kept: list | None, cache: CompressedCache) -> dict | None:
    """GenerationOutput.kept_positions: `kept` (after the prefill) and the cache's now (None: not recorded)."""
    return None if kept is None else {"prefill": kept, "final": cache.kept_positions()}


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, method: Method | None = None, *, max_new_tokens: int,
             stop_token_ids: Sequence[int] = (), min_new_tokens: int = 0,
             repetition_penalty: float = 1.0, question_ids: torch.Tensor | None = None,
             contexts: "ContextCache | None" = None) -> GenerationOutput:
    """Greedy generation for one prompt `input_ids` [1, n] with `method` compressing the cache at prefill.

    With `question_ids` [1, q] the run is query-agnostic: `input_ids` is the context alone, compressed before the
    question is seen (`contexts` reuses a compressed context across samples)."""
    state = start(model, input_ids, method, max_new_tokens=max_new_tokens, question_ids=question_ids,
                  contexts=contexts)
    tokens, stopped, decode_s = greedy_decode(model, state.logits, state.cache, state.seen, state.position,
                                              max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                                              min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                                              schedule=state.schedule)
    return state.finish(tokens, stopped, decode_s)


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
        next_id = next_token(logits, seen, stop, step, min_new_tokens, repetition_penalty)
        if forced is not None:
            if step == len(forced) or int(next_id) != forced[step]:
                raise KvbenchError(f"a resumed session's recorded answer does not reproduce (token {step}: greedy "
                                   f"decoding now picks {int(next_id)}, the record holds "
                                   f"{forced[step] if step < len(forced) else 'no more tokens'}); the earlier "
                                   f"turns ran with other settings or hardware: rerun into a new output_dir")
            next_id = torch.tensor([[forced[step]]], device=device)
        tokens.append(int(next_id))
        ended = stop_reason(next_id, stop, step, max_new_tokens)
        if ended or (forced is not None and step == len(forced) - 1):
            stopped = ended or stopped
            break
        seen = torch.cat([seen, next_id], dim=1) if repetition_penalty != 1.0 else seen
        logits = decode_step(model, next_id, position + step, cache, schedule)
    sync(device)
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


def compress_context(model, context_ids: torch.Tensor, method: Method | None = None,
                     prefilled: Prefilled | None = None) -> CompressedContext:
    """Prefill the context alone at positions 0..C-1 while `method` compresses it (the question is not known).
    `prefilled`: that prefill already done by `method` (a packed prefill of several contexts, `prefill_packed`)."""
    method = method or FullKV()
    check_agnostic_model(model.config)
    state = prefilled if prefilled is not None else prefill(model, context_ids, method)
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
def ask(model, context: CompressedContext, question_ids: torch.Tensor, method: Method | None = None, *,
        reused: bool = False, record_kept: bool = False) -> Started:
    """Feed the question `question_ids` [1, q] over the compressed `context` in one forward, at its true positions,
    into a fork of the context's cache (`batching.fork_cache`), and with a decode schedule of `method` on a copy of
    its per-sample state: the context stays as compressed for the next question, however this one is decoded."""
    state, device = context.prefilled, question_ids.device
    c, q = state.prompt_tokens, question_ids.shape[1]
    cache = fork_cache(state.cache)
    scheduled = method is not None and bool(getattr(method, "decode_interval", None))
    schedule = schedule_for(fork_method(method), model, record_kept=record_kept) if scheduled else None
    peak = schedule.peak if schedule is not None else KvPeak()
    peak.observe(cache)
    kept = state.cache.kept_positions() if record_kept else None
    sync(device)
    begin = time.perf_counter()
    logits = question_forward(model, question_ids, c, cache, schedule)
    sync(device)
    question_s = time.perf_counter() - begin

    def finish(tokens: list[int], stopped: str, decode_s: float) -> GenerationOutput:
        peak.observe(cache)
        return GenerationOutput(tokens, c + q, 0.0 if reused else state.prefill_s, decode_s, context.kv_bytes,
                                list(context.layer_kept), stopped, dict(context.record), cache.any_compressed(),
                                layer_types(cache), context_tokens=c, question_prefill_s=question_s,
                                context_reused=reused, peak_kv_tokens=peak.tokens, peak_kv_bytes=peak.bytes,
                                decode_cuts=schedule.cuts if schedule is not None else None,
                                kept_positions=kept_record(kept, cache))
    return Started(cache, logits, torch.cat([context.context_ids, question_ids], dim=1), c + q, schedule, finish)


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

    def holds(self, model, context_ids: torch.Tensor, method: Method) -> bool:
        """Whether `context_ids` compressed by `method` on `model` is the context kept now."""
        current = self.current
        return (current is not None and self._owner is not None and self._owner[0] is model
                and self._owner[1] is method and current.context_ids.shape == context_ids.shape
                and torch.equal(current.context_ids, context_ids))

    def get(self, model, context_ids: torch.Tensor, method: Method) -> tuple[CompressedContext, bool]:
        if self.holds(model, context_ids, method):
            self.reuses += 1
            self.prefill_s_avoided += self.current.prefilled.prefill_s
            return self.current, True
        self.current = None  # free the previous cache before building the next
        self.put(model, method, compress_context(model, context_ids, method))
        return self.current, False

    def put(self, model, method: Method, context: CompressedContext) -> None:
        """Keep `context`, compressed by `method` (or its copy) on `model` elsewhere (a packed prefill), as the one
        the next samples may reuse."""
        self.current, self._owner = context, (model, method)
        self.prefills += 1

    def stats(self) -> dict:
        return {"context_prefills": self.prefills, "context_prefills_avoided": self.reuses,
                "context_prefill_s_avoided": round(self.prefill_s_avoided, 3)}


def generate_agnostic(model, context_ids: torch.Tensor, question_ids: torch.Tensor, method: Method | None = None, *,
                      max_new_tokens: int, stop_token_ids: Sequence[int] = (), min_new_tokens: int = 0,
                      repetition_penalty: float = 1.0, contexts: ContextCache | None = None) -> GenerationOutput:
    """Query-agnostic generation: compress `context_ids` [1, C] (or reuse it from `contexts`), then answer
    `question_ids` [1, q] at positions C.. and decode. FullKV gives the tokens of `generate` on context+question."""
    return generate(model, context_ids, method, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                    min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty, question_ids=question_ids,
                    contexts=contexts)
