"""The one mechanism that connects methods to any transformers decoder: a wrapper attention function.

Design: we register `kvbench_<impl>` (e.g. `kvbench_sdpa`, `kvbench_flash_attention_2`) with transformers'
`AttentionInterface`. Every model that routes attention through `ALL_ATTENTION_FUNCTIONS` (Llama, Mistral,
Qwen2/3, Gemma, Phi-3, ...) then calls us with the post-RoPE queries and the keys/values the cache returned, so
no modeling code is copied or patched. We run the real attention (`impl`) unchanged, and, during a prefill in a
`compression(...)` context, hand the layer to the method, which rewrites that layer of the cache.

Why not forward hooks (kvpress)? A hook on the attention module sees hidden states, not post-RoPE queries; it must
recompute them per architecture. The attention interface receives them for free and runs on every backend.

Decoding: a single query attends to every token its layer holds, so the mask is dropped (layers may hold
different numbers of tokens; batch size 1, no padding). When a layer stores one row per query head (the official
GQA layout) the backend is told there is no grouping.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvbench.cache import CompressedCache
from kvbench.methods.base import Method
from kvbench.ragged import layer_of

PREFIX = "kvbench_"


@dataclass
class Compression:
    method: Method
    cache: CompressedCache


_ACTIVE: contextvars.ContextVar[Compression | None] = contextvars.ContextVar("kvbench_compression", default=None)


@contextlib.contextmanager
def compression(method: Method, cache: CompressedCache):
    """Within this block, prefill forward passes compress `cache` with `method`."""
    token = _ACTIVE.set(Compression(method, cache))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def _ungrouped(module) -> SimpleNamespace:
    """A stand-in for `module` that tells the backend keys already have one head per query head."""
    return SimpleNamespace(num_key_value_groups=1, is_causal=getattr(module, "is_causal", True),
                           layer_idx=getattr(module, "layer_idx", None), training=False)


def _make_wrapper(impl: str):
    def kvbench_attention(module, query, key, value, attention_mask, **kwargs):
        backend = ALL_ATTENTION_FUNCTIONS[impl]
        ragged = layer_of(key)  # a per-head variable-length layer (kvbench.ragged): its own attention
        if ragged is not None:
            return ragged.attend(query, kwargs.get("scaling")), None
        if query.shape[2] == 1:
            attention_mask = None
            if key.shape[1] == query.shape[1] and getattr(module, "num_key_value_groups", 1) > 1:
                module = _ungrouped(module)
            return backend(module, query, key, value, attention_mask, **kwargs)
        output = backend(module, query, key, value, attention_mask, **kwargs)
        active = _ACTIVE.get()
        if active is not None and key.shape[2] == query.shape[2]:  # a prefill: the cache holds exactly the prompt
            with torch.no_grad():
                active.method.compress_layer(module.layer_idx, query, key, value, active.cache)
        return output

    kvbench_attention.__name__ = f"{PREFIX}{impl}"
    return kvbench_attention


def register(impl: str = "sdpa") -> str:
    """Register `kvbench_<impl>` (idempotent) and return its name, for `attn_implementation=` or
    `model.set_attn_implementation`."""
    if impl.startswith(PREFIX):
        impl = impl[len(PREFIX):]
    if impl not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention implementation {impl!r} is not available; choose one of "
                         f"{sorted(k for k in ALL_ATTENTION_FUNCTIONS.valid_keys() if not k.startswith(PREFIX))}")
    name = f"{PREFIX}{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _make_wrapper(impl))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name
