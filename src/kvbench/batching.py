"""Batched decoding over compressed caches: one model forward for every live sequence, each with its own cache.

`batch_size` (a top-level setting) runs N samples at once through `scheduler.generate_requests`. The plan, chosen for
exactness first:
- prefill and compression are per sample: the prompts (query-agnostic: the contexts) admitted together share one
  packed forward (`engine.prefill_packed`: a `BatchedCache` with `lengths` hands prompt b's run of keys/values to
  b's own cache, and the attention wrapper attends and compresses each run as b's batch-1 prefill would); the
  query-agnostic question forward and the shared-context reuse run per sample. Every sequence keeps exactly the
  positions and per-head counts it keeps alone;
- decoding is batched: one forward for all live sequences per step ([B, 1] tokens at each sequence's own true
  position), so every weight matrix is read once per step for B tokens -- where the speed comes from;
- inside that forward, each layer's new key/value row b goes to sequence b's own cache layer (any kind: full,
  sliding/chunked, ragged per-head, per-query-head layout) through `BatchedCache`, and the attention wrapper
  (kvbench.attention) attends row b over that layer exactly as a batch-1 decoding step would, then hands row b's
  query to sequence b's decode schedule (decoding-time compression). Attention is a small part of a decoding
  step next to the weights; the loop over sequences inside each layer runs B small attention calls.

What differs from batch 1 is only the batched matrix products outside attention (a [B, d] GEMM instead of B
[1, d] ones): they may sum in another order, so logits can differ in the last bits (measured and bounded in the
tests); the tokens and kept positions are tested equal to batch 1 on the tiny models.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvbench.cache import CompressedCache, CompressedLayers
from kvbench.methods.base import Method


class _RowsLayer(DynamicLayer):
    """Decoder layer `index` over a batch: sequence b's part of the forward goes to its own layer
    (`caches[b].layers[index]`, looked up at each call: a decoding-time cut may have replaced it) -- row b of a
    decoding step, or, in a packed prefill (`lengths`), the b-th run of `lengths[b]` tokens along the sequence.
    `returned[b]` is what that layer's `update` returned."""

    def __init__(self, caches: Sequence[CompressedCache], index: int, lengths: Sequence[int] | None) -> None:
        super().__init__()
        self.caches, self.index, self.lengths = caches, index, lengths
        self.is_sliding = caches[0].kinds[index].local
        self.returned: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.is_initialized = True

    def _parts(self, states: torch.Tensor) -> list[torch.Tensor]:
        if self.lengths is None:
            return [states[b:b + 1] for b in range(len(self.caches))]
        return list(states.split(list(self.lengths), dim=2))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.returned = [cache.layers[self.index].update(keys, values, *args, **kwargs)
                         for cache, keys, values in zip(self.caches, self._parts(key_states),
                                                        self._parts(value_states))]
        return key_states, value_states  # the wrapper reads `returned`; these only flow to it

    def get_seq_length(self) -> int:
        return max(cache.layers[self.index].get_seq_length() for cache in self.caches)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0  # the mask is not used: each sequence attends its own layer


class BatchedCache(Cache):
    """The cache a forward over several sequences sees: one `_RowsLayer` per decoder layer over the sequences'
    caches. Rows of a decoding step, or (`lengths`) the consecutive prompts of a packed prefill."""

    def __init__(self, caches: Sequence[CompressedCache], lengths: Sequence[int] | None = None) -> None:
        super().__init__(layers=[_RowsLayer(caches, i, lengths) for i in range(len(caches[0].layers))])
        self.caches = list(caches)

    def returned(self, layer_idx: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence, the (keys, values) its layer `layer_idx` returned in this forward."""
        return self.layers[layer_idx].returned


def fork_cache(cache: CompressedCache) -> CompressedCache:
    """A cache of its own over the same compressed tensors (appending and cutting replace a layer's tensors, never
    write into them): several questions over one compressed context decode side by side, and the context stays as
    compressed for the next sample."""
    fork = copy.copy(cache)
    fork.layers = [copy.copy(layer) for layer in cache.layers]
    fork.compressed = CompressedLayers(fork, fork.compressed_layers)
    return fork


def fork_method(method):
    """A copy of `method` with its own per-sample containers (H2O's accumulated scores, per-head budgets) and its
    own copy of any method it wraps (AdaKV's scorer), for a sequence whose prefill or decode schedule runs while
    other samples are prefilled with the original. What the methods only read (a bound model, statistics) is
    shared."""
    fork = copy.copy(method)
    for name, value in vars(method).items():
        if isinstance(value, (dict, list)):
            setattr(fork, name, copy.copy(value))
        elif isinstance(value, Method):
            setattr(fork, name, fork_method(value))
    return fork
