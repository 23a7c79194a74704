"""The one mechanism that connects methods to any transformers decoder: a wrapper attention function.

Hot-path contract (engine, attention, cache, ragged):
- engine.py owns the forward passes: it opens a `Session` (`compression(...)`, `decoding(...)`) for every forward
  over a kvbench cache and declares its `Phase`; it never reads or writes layer tensors.
- attention.py (this file) may read the session's cache layers and the tensors the model hands it, run the backend
  or a ragged layer's `attend`, and hand each compressed layer to the method (`compress_layer`, `observe_layer`) or
  to the decode schedule; it dispatches on the declared phase only, never infers it from shapes, and a shape that
  contradicts the phase is an error. It never replaces a layer itself.
- cache.py holds the layers, knows their kinds and the rank of each compressed layer (`rank(layer_idx)`: the
  model's decoder-layer index -> the index among compressed layers, what methods receive); it runs no attention.
- ragged.py stores a per-head variable-length layer and attends over it; it is reached through the cache
  (`cache.layers[layer_idx]`), keeps no global state and knows nothing of sessions or methods.

Design: we register `kvbench_<impl>` (e.g. `kvbench_sdpa`, `kvbench_eager`, `kvbench_flash_attention_2`) with
transformers' `AttentionInterface`. Every model that routes attention through `ALL_ATTENTION_FUNCTIONS` (Llama,
Mistral, Qwen2/3, Gemma 2/3, Phi-3, gpt-oss, ...) then calls us with the post-RoPE queries and the keys/values the
cache returned, so no modeling code is copied or patched. We run the real attention (`impl`; for `eager`, the
model's own `eager_attention_forward`) unchanged, and, during a prefill in a `compression(...)` context, hand
each compressed layer to the method, which rewrites that layer of the cache.

Why not forward hooks (kvpress)? A hook on the attention module sees hidden states, not post-RoPE queries; it must
recompute them per architecture. The attention interface receives them for free and runs on every backend.

Phases (`Phase`, set by the engine on the `Session`):
- `PREFILL` (`_compress`): the prompt over an empty cache. The method sees the tokens the layer holds after the
  prefill (a local layer: the last `window - 1`), queries rescaled to the 1/sqrt(head_dim) its scores assume
  (Gemma's `query_pre_attn_scalar`). A logit soft-cap or attention sinks change the attention in ways the scores
  do not model: methods that score attention refuse such a model rather than select by the wrong attention.
- `OBSERVE` (`_observe`): a method's extra multi-token passes over the filled cache after the prefill (KVzip's
  reconstruction, from `Method.after_prefill`), shown to `Method.observe_layer`.
- `QUESTION`: query-agnostic runs, the question's tokens over the compressed context, with a mask built per layer
  (layers hold different numbers of tokens); a one-token question is attended as a decoding step.
- `DECODE` (`_decode`, one query, batch size 1, no padding): the model's mask is not used (it is built for one
  layer's length, and compressed layers differ). A full layer's query attends to every token the layer holds; a
  local layer says which of its tokens are still inside the window (or chunk). When a layer stores one row per
  query head (the official GQA layout) the backend is told there is no grouping.
A packed prefill (`packed_prefill`, engine.prefill_packed) is one PREFILL forward over several prompts laid end to
end: each prompt's run of queries attends to its own keys with the mask transformers builds for its batch-1 prefill
(`prefill_mask`; the model's whole-forward mask is not built) and is compressed by its own method, as alone.
A ragged layer (kvbench.ragged, found as `session.cache.layers[module.layer_idx]`) attends itself in every phase
after the prefill. Outside any session the wrapper is the plain backend.

Batched decoding (`decoding_batch`, kvbench.batching): one DECODE forward for several samples; row b of
each layer attends to sample b's own cache layer through the path above, as a batch-1 step would, and feeds b's
decode schedule.

Compression during decoding (`method.decode_interval`): in a `decoding(cache, schedule)` block (`QUESTION` or
`DECODE`), every compressed layer's queries go to the schedule after the layer's attention, and every N forwards it
cuts the layer back to its budget there (kvbench.decoding).
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask, create_chunked_causal_mask,
                                        create_sliding_window_causal_mask)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvbench.cache import FULL, CompressedCache
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method
from kvbench.ragged import RaggedLayer

if TYPE_CHECKING:
    from kvbench.decoding import DecodeSchedule

PREFIX = "kvbench_"
MODEL_EAGER = "eager"  # not in ALL_ATTENTION_FUNCTIONS: each modeling file has its own eager_attention_forward


class Phase(enum.Enum):
    """Which forward the engine is running (see the module docstring)."""
    PREFILL = "prefill"  # the prompt over an empty cache; the method compresses each layer
    OBSERVE = "observe"  # a method's extra passes over the filled cache (KVzip's reconstruction)
    QUESTION = "question"  # query-agnostic: the question's tokens over the compressed context
    DECODE = "decode"  # one new token


@dataclass
class Session:
    """The cache of the sample being run, the phase the engine declared, and its method or decode schedule."""
    cache: CompressedCache
    phase: Phase
    method: Method | None = None  # PREFILL and OBSERVE
    compressed_calls: int = 0  # compressed layers handed to the method (0 after a prefill: the hook never ran)
    schedule: "DecodeSchedule | None" = None  # decoding-time compression (kvbench.decoding), after the prefill
    sequences: "list[Session] | None" = None  # several samples: row b / packed prompt b attends as sequences[b] alone
    masks: dict = field(default_factory=dict)  # a packed prefill: each prompt length's mask per layer kind, built once

    @property
    def packed(self) -> bool:
        """A packed prefill: several prompts laid end to end in one PREFILL forward (`packed_prefill`)."""
        return self.sequences is not None and self.phase is Phase.PREFILL

    def observe(self) -> None:
        """After the prefill forward: what follows are the method's observation passes (`Method.after_prefill`)."""
        if self.phase is not Phase.PREFILL:
            raise RuntimeError(f"observation passes follow a prefill, not a {self.phase.value} forward")
        self.phase = Phase.OBSERVE


_ACTIVE: contextvars.ContextVar[Session | None] = contextvars.ContextVar("kvbench_session", default=None)


@contextlib.contextmanager
def _session(session: Session):
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def compression(method: Method, cache: CompressedCache):
    """Within this block, forward passes are the prefill that compresses `cache` with `method` (yields the Session;
    `session.observe()` then declares the method's observation passes)."""
    return _session(Session(cache, Phase.PREFILL, method))


def decoding(cache: CompressedCache, schedule: "DecodeSchedule | None" = None, phase: Phase = Phase.DECODE):
    """Within this block, forward passes are decoding steps (or, with `phase=Phase.QUESTION`, the query-agnostic
    question) that attend to `cache` layer by layer (windows of local layers respected); with a `schedule`, each
    compressed layer's queries are buffered and the layer cut when the schedule says so."""
    if phase not in (Phase.DECODE, Phase.QUESTION):
        raise ValueError(f"decoding(...) runs DECODE or QUESTION forwards, not {phase}")
    return _session(Session(cache, phase, schedule=schedule))


def decoding_batch(cache, sequences: "list[Session]"):
    """Within this block, a decoding forward over a batch (kvbench.batching): row b of every layer attends, as a
    batch-1 step would, to the layer of `sequences[b]` (a `decoding` Session with its own cache and schedule);
    `cache` is the `BatchedCache` that says what each sequence's layer returned."""
    return _session(Session(cache, Phase.DECODE, sequences=sequences))


@contextlib.contextmanager
def packed_prefill(cache, methods: "list[Method]"):
    """Within this block, one forward is the prefill of several prompts packed along the sequence
    (`engine.prefill_packed`): `cache` is the `BatchedCache` over their caches (with their `lengths`), and in every
    layer prompt b's run of queries attends only to its own keys, with the mask its batch-1 prefill would have, and
    `methods[b]` compresses b's layer as alone. Yields the prompts' own sessions (their `compressed_calls`; then
    `observing(...)` for a method's observation passes)."""
    sequences = [Session(layers, Phase.PREFILL, method) for layers, method in zip(cache.caches, methods)]
    with _session(Session(cache, Phase.PREFILL, sequences=sequences)):
        yield sequences


@contextlib.contextmanager
def observing(session: Session):
    """A prompt of a packed prefill, after the packed forward: its method's observation passes over its own cache
    (`Method.after_prefill`, KVzip's reconstruction) run as they run after a batch-1 prefill."""
    session.observe()
    with _session(session):
        yield session


def _packed_prefill(impl: str, module, query, kwargs: dict, session: Session) -> torch.Tensor:
    outputs, start = [], 0
    position_ids = kwargs.get("position_ids")
    kind = session.cache.caches[0].kinds[module.layer_idx].type
    for sequence, (key, value) in zip(session.sequences, session.cache.returned(module.layer_idx)):
        n = key.shape[2]
        own = dict(kwargs)
        if position_ids is not None:  # a varlen-aware backend would otherwise see the packing
            own["position_ids"] = position_ids[:, start:start + n]
        rows = query[:, :, start:start + n]
        with _session(sequence):  # (the model's mask function then builds this prompt's mask, as at batch 1)
            if (kind, n) not in session.masks:
                session.masks[kind, n] = prefill_mask(module, kind, rows)
            outputs.append(_attention(impl, sequence, module, rows, key, value, session.masks[kind, n], own)[0])
        start += n
    return torch.cat(outputs, dim=1)  # backends return [1, n, heads, d]


_MASKS = {FULL: create_causal_mask, "sliding_attention": create_sliding_window_causal_mask,
          "chunked_attention": create_chunked_causal_mask}


def prefill_mask(module, kind: str, query: torch.Tensor):
    """The mask transformers builds for a batch-1 prefill of `query`'s tokens over a layer of type `kind`
    (`full_attention`, `sliding_attention`, `chunked_attention`), by its own mask functions for the model's config
    and backend."""
    config = getattr(module, "config", None)
    if config is None:
        raise KvbenchError(f"{type(module).__name__} has no config: a packed prefill cannot build its masks; use "
                           f"batch_size=1 or prefill_pack_tokens=0")
    shape = query.new_empty((1, query.shape[2], 0))  # the mask functions read the batch, length, dtype, device
    return _MASKS[kind](config, shape, None, None)


def _model_mask(base):
    """The model's own mask function, except in a packed prefill, where each prompt's mask is built per run of
    tokens (`prefill_mask`) and the whole forward's would only cost memory."""
    def mask(*args, **kwargs):
        session = _ACTIVE.get()
        return None if session is not None and session.packed else base(*args, **kwargs)
    return mask


def _batched(impl: str, module, query, kwargs: dict, session: Session) -> torch.Tensor:
    outputs = []
    for b, (sequence, (key, value)) in enumerate(zip(session.sequences, session.cache.returned(module.layer_idx))):
        row = query[b:b + 1]
        with _session(sequence):
            outputs.append(_attention(impl, sequence, module, row, key, value, None, kwargs)[0])
            if sequence.schedule is not None:
                sequence.schedule.after_attention(sequence.cache, module.layer_idx, row, kwargs)
    return torch.cat(outputs)


class _Ungrouped:
    """`module` as seen by a backend when keys already have one head per query head."""

    num_key_value_groups = 1

    def __init__(self, module) -> None:
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _backend(impl: str, module):
    if impl == MODEL_EAGER:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            raise KvbenchError(f"{type(module).__name__} has no eager_attention_forward; use attn_implementation=sdpa")
        return eager
    return ALL_ATTENTION_FUNCTIONS[impl]


def _refuse_unscorable(method: Method, kwargs: dict) -> None:
    """A method that scores tokens by attention cannot select correctly where the model's attention has terms its
    scores ignore. Position- or key-only methods (`attention_free = True`) are unaffected."""
    if method.attention_free:
        return
    why = None
    if kwargs.get("softcap") is not None:
        why = f"soft-caps its attention logits (softcap={kwargs['softcap']})"
    elif kwargs.get("s_aux") is not None:
        why = "adds attention sinks (learned per-head logits) to its softmax"
    if why:
        raise KvbenchError(f"method {method.name} cannot compress this model: it {why}, which {method.name}'s "
                           f"attention scores do not model, so it would keep the wrong tokens. Use method=fullkv or "
                           f"method=streamingllm (position-based) on this model")


def _compress(session: Session, module, query, key, value, kwargs: dict) -> None:
    cache, method = session.cache, session.method
    layer_idx = module.layer_idx
    rank = cache.rank(layer_idx)
    if rank is None:  # a local layer left as the model defines it
        return
    session.compressed_calls += 1
    n = key.shape[2]
    held = cache.held_at_prefill(layer_idx, n)
    if held < n:  # a local layer holds the last `window - 1` tokens: the method compresses those
        query, key, value = query[:, :, -held:], key[:, :, -held:], value[:, :, -held:]
        cache.layers[layer_idx].offset = n - held
    if method.keeps_all(held) and not getattr(method, "decode_interval", None):
        return  # (a decode schedule scores later: the method sees the prompt anyway, e.g. H2O's accumulation)
    _refuse_unscorable(method, kwargs)
    scaling = kwargs.get("scaling")
    dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling * math.sqrt(dim), 1.0, rel_tol=1e-6):
        query = query * (scaling * math.sqrt(dim))  # the scores' 1/sqrt(d) then gives the model's logits
    method.compress_layer(rank, query, key, value, cache.compressed)


def _observe(session: Session, module, query, key, kwargs: dict) -> None:
    """Show a compressed layer's multi-token pass over its filled cache to the method (`Method.observe_layer`)."""
    rank = session.cache.rank(module.layer_idx)
    if rank is None:
        return
    scaling = kwargs.get("scaling")
    dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling * math.sqrt(dim), 1.0, rel_tol=1e-6):
        query = query * (scaling * math.sqrt(dim))
    session.method.observe_layer(rank, query, key)


def _decode(impl: str, module, query, key, value, kwargs: dict, layer):
    """One new token over `layer` (the session's cache layer) as the backend's keys `key` returned them."""
    visible = layer.decode_visible(key.shape[2])
    heads, groups = query.shape[1], getattr(module, "num_key_value_groups", 1)
    if visible is None:
        backend = _backend(impl, module)
        if key.shape[1] == heads and groups > 1:
            module = _Ungrouped(module)
        return backend(module, query, key, value, None, **kwargs)
    # Some held tokens are outside the window: a per-query-head mask, on a backend that takes one.
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    if visible.shape[0] not in (1, heads):
        visible = visible.repeat_interleave(heads // visible.shape[0], dim=0)
    mask = visible[None, :, None, :]
    if impl == MODEL_EAGER:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    elif impl != "sdpa":  # flash/flex kernels take no per-head mask; one decoding query is cheap in sdpa
        impl = "sdpa"
    backend = _backend(impl, module)
    module = _Ungrouped(module) if groups > 1 else module
    return backend(module, query, key, value, mask, **kwargs)


def cached_prefix_mask(query: torch.Tensor, key: torch.Tensor, impl: str) -> torch.Tensor | None:
    """Mask for m new tokens over a cache of n - m held tokens (query-agnostic question forward): every held
    token is visible, the new ones causally (bottom-right aligned). Layers may hold different numbers of tokens, so
    the model's own mask (sized from layer 0) cannot be used. Flash kernels align `causal` bottom-right already."""
    if impl.startswith("flash"):
        return None
    m, n = query.shape[2], key.shape[2]
    rows = torch.arange(m, device=query.device)[:, None] + (n - m)
    future = torch.arange(n, device=query.device)[None, :] > rows
    mask = torch.zeros((m, n), dtype=query.dtype, device=query.device)
    return mask.masked_fill(future, torch.finfo(query.dtype).min)[None, None]


def _make_wrapper(impl: str):
    def kvbench_attention(module, query, key, value, attention_mask, **kwargs):
        session = _ACTIVE.get()
        if session is None:  # not a kvbench forward (e.g. `model.generate` with its own cache): the plain backend
            return _backend(impl, module)(module, query, key, value, attention_mask, **kwargs)
        if session.sequences is not None:
            several = _packed_prefill if session.packed else _batched
            return several(impl, module, query, kwargs, session), None
        output = _attention(impl, session, module, query, key, value, attention_mask, kwargs)
        if session.schedule is not None:
            session.schedule.after_attention(session.cache, module.layer_idx, query, kwargs)
        return output

    kvbench_attention.__name__ = f"{PREFIX}{impl}"
    return kvbench_attention


def _over_cache(impl: str, module, query, key, value, kwargs: dict):
    """Several new tokens over a (compressed) cache whose layers hold different numbers of tokens: the mask is
    built here, per layer (the model's own is sized from layer 0)."""
    groups = getattr(module, "num_key_value_groups", 1)
    module = _Ungrouped(module) if key.shape[1] == query.shape[1] and groups > 1 else module
    return _backend(impl, module)(module, query, key, value, cached_prefix_mask(query, key, impl), **kwargs)


def _attention(impl: str, session: Session, module, query, key, value, attention_mask, kwargs: dict):
    """One layer's attention in the phase the engine declared; a shape that contradicts the phase is an error."""
    phase, m = session.phase, query.shape[2]
    layer = session.cache.layers[module.layer_idx]
    if phase is Phase.PREFILL:
        n = key.shape[2]
        assert n == m and not isinstance(layer, RaggedLayer), (
            f"prefill: layer {module.layer_idx} returned {n} keys for {m} queries (the cache was not empty)")
        output = _backend(impl, module)(module, query, key, value, attention_mask, **kwargs)
        with torch.no_grad():  # the layer's keys are exactly the prompt
            _compress(session, module, query, key, value, kwargs)
        return output
    if isinstance(layer, RaggedLayer):  # a per-head variable-length layer (kvbench.ragged) attends itself
        assert key is layer.prefix_keys, f"layer {module.layer_idx} is ragged but did not return its prefix keys"
        assert phase is not Phase.OBSERVE, "observation passes run over the dense cache, before any selection"
        return layer.attend(query, kwargs.get("scaling")), None
    if phase is Phase.DECODE or (phase is Phase.QUESTION and m == 1):
        assert m == 1, f"decode: {m} new tokens in one step (one token per decoding forward)"
        return _decode(impl, module, query, key, value, kwargs, layer)
    n = key.shape[2]
    assert n > m, f"{phase.value}: layer {module.layer_idx} returned {n} keys for {m} queries (no cache under them)"
    if phase is Phase.QUESTION:
        return _over_cache(impl, module, query, key, value, kwargs)
    # OBSERVE: a multi-token pass over the filled cache (every layer the same length: the model's mask applies)
    output = _backend(impl, module)(module, query, key, value, attention_mask, **kwargs)
    with torch.no_grad():
        _observe(session, module, query, key, kwargs)
    return output


def register(impl: str = "sdpa") -> str:
    """Register `kvbench_<impl>` (idempotent) and return its name, for `attn_implementation=` or
    `model.set_attn_implementation`. `eager` runs each model's own eager attention (soft-capping, sinks)."""
    if impl.startswith(PREFIX):
        impl = impl[len(PREFIX):]
    if impl != MODEL_EAGER and impl not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {impl!r} is not available; choose one of "
                         f"{sorted(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if not k.startswith(PREFIX))}")
    name = f"{PREFIX}{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _make_wrapper(impl))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, _model_mask(ALL_MASK_ATTENTION_FUNCTIONS[impl]))
    return name
