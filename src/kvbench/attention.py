"""The one mechanism that connects methods to any transformers decoder: a wrapper attention function.

Design: we register `kvbench_<impl>` (e.g. `kvbench_sdpa`, `kvbench_eager`, `kvbench_flash_attention_2`) with
transformers' `AttentionInterface`. Every model that routes attention through `ALL_ATTENTION_FUNCTIONS` (Llama,
Mistral, Qwen2/3, Gemma 2/3, Phi-3, gpt-oss, ...) then calls us with the post-RoPE queries and the keys/values the
cache returned, so no modeling code is copied or patched. We run the real attention (`impl`; for `eager`, the
model's own `eager_attention_forward`) unchanged, and, during a prefill in a `compression(...)` context, hand
each compressed layer to the method, which rewrites that layer of the cache.

Why not forward hooks (kvpress)? A hook on the attention module sees hidden states, not post-RoPE queries; it must
recompute them per architecture. The attention interface receives them for free and runs on every backend.

Prefill (`_compress`): the method sees the tokens the layer holds after the prefill (a local layer: the last
`window - 1`), queries rescaled to the 1/sqrt(head_dim) its scores assume (Gemma's `query_pre_attn_scalar`).
A logit soft-cap or attention sinks change the attention in ways the scores do not model: methods that score
attention refuse such a model rather than select by the wrong attention.

Decoding (`_decode`, one query, batch size 1, no padding): the model's mask is not used (it is built for one
layer's length, and compressed layers differ). A full layer's query attends to every token the layer holds; a
local layer says which of its tokens are still inside the window (or chunk). When a layer stores one row per
query head (the official GQA layout) the backend is told there is no grouping.

Batched decoding (`decoding_batch`, kvbench.batching): one forward for several samples; row b of each layer attends
to sample b's own cache layer through the path above, as a batch-1 step would, and feeds b's decode schedule.

Compression during decoding (`method.decode_interval`): in a `decoding(cache, schedule)` block, every compressed
layer's queries go to the schedule after the layer's attention, and every N forwards it cuts the layer back to its
budget there (kvbench.decoding).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvbench.cache import CompressedCache
from kvbench.errors import KvbenchError
from kvbench.methods.base import Method
from kvbench.ragged import RaggedLayer, layer_of, register_layer

if TYPE_CHECKING:
    from kvbench.decoding import DecodeSchedule

PREFIX = "kvbench_"
MODEL_EAGER = "eager"  # not in ALL_ATTENTION_FUNCTIONS: each modeling file has its own eager_attention_forward


@dataclass
class Session:
    """The cache of the sample being run, and during a compressing prefill its method."""
    cache: CompressedCache
    method: Method | None = None
    compressed_calls: int = 0  # compressed layers handed to the method (0 after a prefill: the hook never ran)
    schedule: "DecodeSchedule | None" = None  # decoding-time compression (kvbench.decoding), after the prefill
    sequences: "list[Session] | None" = None  # a batched decoding step: row b attends as sequences[b] alone


_ACTIVE: contextvars.ContextVar[Session | None] = contextvars.ContextVar("kvbench_session", default=None)


@contextlib.contextmanager
def _session(session: Session):
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def compression(method: Method, cache: CompressedCache):
    """Within this block, prefill forward passes compress `cache` with `method` (yields the Session)."""
    return _session(Session(cache, method))


def decoding(cache: CompressedCache, schedule: "DecodeSchedule | None" = None):
    """Within this block, decoding steps attend to `cache` layer by layer (windows of local layers respected); with
    a `schedule`, each compressed layer's queries are buffered and the layer cut when the schedule says so."""
    return _session(Session(cache, schedule=schedule))


def decoding_batch(cache, sequences: "list[Session]"):
    """Within this block, a decoding forward over a batch (kvbench.batching): row b of every layer attends, as a
    batch-1 step would, to the layer of `sequences[b]` (a `decoding` Session with its own cache and schedule);
    `cache` is the `BatchedCache` that says what each sequence's layer returned."""
    return _session(Session(cache, sequences=sequences))


def _batched(impl: str, module, query, kwargs: dict, session: Session) -> torch.Tensor:
    outputs = []
    for b, (sequence, (key, value)) in enumerate(zip(session.sequences, session.cache.returned(module.layer_idx))):
        layer = sequence.cache.layers[module.layer_idx]
        if isinstance(layer, RaggedLayer):  # questions over one compressed context share its prefix tensors
            register_layer(layer)
        token = _ACTIVE.set(sequence)
        try:
            row = query[b:b + 1]
            outputs.append(_attention(impl, module, row, key, value, None, kwargs)[0])
            if sequence.schedule is not None:
                sequence.schedule.after_attention(sequence.cache, module.layer_idx, row, kwargs)
        finally:
            _ACTIVE.reset(token)
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


def _decode(impl: str, module, query, key, value, kwargs: dict):
    session = _ACTIVE.get()
    layer = session.cache.layers[module.layer_idx] if session is not None else None
    visible = layer.decode_visible(key.shape[2]) if hasattr(layer, "decode_visible") else None
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
        if session is not None and session.sequences is not None:
            return _batched(impl, module, query, kwargs, session), None
        output = _attention(impl, module, query, key, value, attention_mask, kwargs)
        if session is not None and session.schedule is not None:
            session.schedule.after_attention(session.cache, module.layer_idx, query, kwargs)
        return output

    kvbench_attention.__name__ = f"{PREFIX}{impl}"
    return kvbench_attention


def _attention(impl: str, module, query, key, value, attention_mask, kwargs: dict):
    """The attention of one layer (backend, ragged layer or masked decoding), and at prefill the compression."""
    ragged = layer_of(key)  # a per-head variable-length layer (kvbench.ragged) attends itself
    if ragged is not None:
        return ragged.attend(query, kwargs.get("scaling")), None
    if query.shape[2] == 1:
        return _decode(impl, module, query, key, value, kwargs)
    session = _ACTIVE.get()
    if key.shape[2] > query.shape[2] and (session is None or session.method is None):
        # Several new tokens over a (compressed) cache outside any compression: the query-agnostic question
        # forward. Layers hold different numbers of tokens, so the mask is built here, per layer.
        groups = getattr(module, "num_key_value_groups", 1)
        module = _Ungrouped(module) if key.shape[1] == query.shape[1] and groups > 1 else module
        return _backend(impl, module)(module, query, key, value, cached_prefix_mask(query, key, impl), **kwargs)
    output = _backend(impl, module)(module, query, key, value, attention_mask, **kwargs)
    session = _ACTIVE.get()
    if session is not None and session.method is not None and key.shape[2] == query.shape[2]:
        with torch.no_grad():  # a prefill: the layer's keys are exactly the prompt
            _compress(session, module, query, key, value, kwargs)
    elif session is not None and session.method is not None and key.shape[2] > query.shape[2]:
        with torch.no_grad():  # a multi-token pass over a filled cache (KVzip's reconstruction passes)
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
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name
