"""A KV cache that mirrors the model's layer types and whose layers can be compressed after prefill.

Hot-path contract (engine, attention, cache, ragged): the cache holds one layer per decoder layer and knows each
layer's kind and, for the compressed ones, its rank (`rank(layer_idx)`). Naming, here and everywhere: `layer_idx`
is the model's decoder-layer index (`module.layer_idx`, `cache.layers[layer_idx]`); `rank` is the index among the
compressed layers, what methods receive and what their view `cache.compressed.layers[rank]` is indexed by. Layers
are replaced by methods (through that view) and by decoding-time cuts; the cache runs no attention, knows nothing
of sessions or phases, and its ragged layers (ragged.py) are reached through `layers` like any other.

Layer types come from the model's config in one place, `layer_kinds` (transformers' own
`get_layer_types_and_kwargs`: `layer_types`, `sliding_window`, `use_sliding_window`/`max_window_layers`,
`attention_chunk_size`):

- a full-attention layer is a `CompressibleLayer` (a transformers `DynamicLayer`): it holds the whole prompt, or
  the tokens a method kept;
- a sliding-window or chunked layer is a `LocalLayer` (a transformers `DynamicSlidingWindowLayer`): bounded as
  `generate` caches it (the last `window - 1` tokens). By default (`method.local_layers=keep`) it is left as the
  model defines it; with `local_layers=compress` a method compresses the tokens it holds, and decoding still
  respects the window (or chunk) through the original positions of the kept tokens.

Every layer stores keys and values after RoPE, plus the original prompt positions of the tokens a method kept
(for the golden checks and the per-sample logs). After compression in the official GQA layout
(`per_query_head`) a layer holds one key/value row per query head; tokens appended during decoding arrive with
the model's KV heads and are expanded to match.

The methods see only the layers they compress, through `CompressedCache.compressed`: its layer 0 is the first
compressed layer, and budget schedules over layers (PyramidKV, DynamicKV) run over those layers only.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer, get_layer_types_and_kwargs

from kvbench.errors import KvbenchError

FULL = "full_attention"
LOCAL_TYPES = ("sliding_attention", "chunked_attention")
LOCAL_LAYERS = ("keep", "compress")  # what a method does to sliding/chunked layers (method.local_layers)


@dataclass(frozen=True)
class LayerKind:
    """How one decoder layer attends: `full_attention`, or `sliding_attention`/`chunked_attention` over `window`
    tokens (the sliding window, or the chunk size)."""
    type: str = FULL
    window: int | None = None

    @property
    def local(self) -> bool:
        return self.type in LOCAL_TYPES

    def short(self) -> str:
        return "full" if not self.local else f"{self.type.split('_')[0]}:{self.window}"


def text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_kinds(config) -> list[LayerKind]:
    """The attention type of every decoder layer, from the model's config (the one place this is derived)."""
    types, kwargs = get_layer_types_and_kwargs(text_config(config))
    kinds = []
    for i, (kind, extra) in enumerate(zip(types, kwargs)):
        if kind == FULL:
            kinds.append(LayerKind())
        elif kind in LOCAL_TYPES:
            kinds.append(LayerKind(kind, int(extra["sliding_window"])))
        else:
            raise KvbenchError(f"layer {i} of this model is a {kind!r} layer: kvbench caches full, sliding-window "
                               f"and chunked attention layers only; this architecture is not supported")
    return kinds


class _Compressible:
    """What both layer kinds add to transformers' layers: replacement by a selection of tokens."""

    positions: torch.Tensor | None  # [heads, kept] prompt positions kept, relative to the layer's first held token
    heads_stored: int | None  # number of heads after compression (None: the model's KV heads)
    offset: int  # prompt position of the first token the layer held when the method saw it

    def _init_compressible(self) -> None:
        self.positions = None
        self.heads_stored = None
        self.offset = 0

    def _expand(self, key_states: torch.Tensor, value_states: torch.Tensor):
        if self.heads_stored is not None and key_states.shape[1] != self.heads_stored:
            groups = self.heads_stored // key_states.shape[1]
            key_states = key_states.repeat_interleave(groups, dim=1)
            value_states = value_states.repeat_interleave(groups, dim=1)
        return key_states, value_states

    def replace(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store `keys`/`values` [1, heads, kept, d] that hold the layer's tokens at `positions` [heads, kept]
        (positions among the tokens the method was given)."""
        self.keys, self.values, self.positions = keys.contiguous(), values.contiguous(), positions
        self.heads_stored = keys.shape[1]

    @property
    def compressed(self) -> bool:
        return self.positions is not None

    def held(self) -> int:
        """Tokens per head the layer holds now."""
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def kept_positions(self) -> list[list[int]]:
        """Original prompt positions held, per head."""
        if self.positions is None:
            heads, n = self.keys.shape[1], self.held()
            first = getattr(self, "cumulative_length", n) - n  # a local layer holds the last tokens
            return [list(range(first, first + n)) for _ in range(heads)]
        return (self.positions + self.offset).tolist()


class CompressibleLayer(_Compressible, DynamicLayer):
    """A full-attention layer (transformers' DynamicLayer) that a method may replace by a selection of its tokens.
    A decoding query may see every token it holds."""

    kind = LayerKind()

    def __init__(self) -> None:
        super().__init__()
        self._init_compressible()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return super().update(*self._expand(key_states, value_states), *args, **kwargs)

    def decode_visible(self, kv_length: int) -> torch.Tensor | None:
        return None  # every held token


class LocalLayer(_Compressible, DynamicSlidingWindowLayer):
    """A sliding-window or chunked layer, bounded exactly as transformers' DynamicSlidingWindowLayer (it keeps the
    last `window - 1` tokens). Once a method compressed it, new tokens are appended and tokens that no head can
    see any more are dropped; `decode_visible` says which held tokens the decoding query may attend to."""

    def __init__(self, kind: LayerKind) -> None:
        super().__init__(sliding_window=kind.window)
        self._init_compressible()
        self.kind = kind
        self.abs_positions: torch.Tensor | None = None  # [heads, held] absolute positions, once compressed

    def replace(self, keys, values, positions) -> None:
        super().replace(keys, values, positions)
        self.abs_positions = positions + self.offset

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.positions is None:
            return super().update(key_states, value_states, *args, **kwargs)
        key_states, value_states = self._expand(key_states, value_states)
        new = key_states.shape[-2]
        first = self.cumulative_length
        self.cumulative_length += new
        added = torch.arange(first, first + new, device=self.abs_positions.device)
        positions = torch.cat([self.abs_positions, added.expand(self.abs_positions.shape[0], -1)], dim=1)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        alive = self._visible_from(positions, self.cumulative_length - 1).any(dim=0)
        if not bool(alive.all()):  # columns that no head can see any more (sliding out of the window)
            keys, values, positions = keys[:, :, alive], values[:, :, alive], positions[:, alive]
        self.keys, self.values, self.abs_positions = keys, values, positions
        return keys, values

    def _visible_from(self, positions: torch.Tensor, query: int) -> torch.Tensor:
        if self.kind.type == "chunked_attention":
            return positions >= (query // self.kind.window) * self.kind.window
        return positions > query - self.kind.window

    def decode_visible(self, kv_length: int) -> torch.Tensor | None:
        """[heads or 1, kv_length] True where the query just appended may attend, or None where it sees all."""
        position = self.cumulative_length - 1
        if self.abs_positions is not None and self.abs_positions.shape[1] == kv_length:
            positions = self.abs_positions
        else:  # uncompressed: the returned keys are the last `kv_length` positions up to `position`
            positions = torch.arange(position - kv_length + 1, position + 1, device=self.keys.device)[None]
        visible = self._visible_from(positions, position)
        return None if bool(visible.all()) else visible


class LayerView(Sequence):
    """A write-through list of some of a cache's layers (`view[i] = layer` replaces the underlying layer)."""

    def __init__(self, layers: list, indices: list[int]) -> None:
        self._layers, self.indices = layers, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._layers[j] for j in self.indices[i]]
        return self._layers[self.indices[i]]

    def __setitem__(self, i: int, layer) -> None:
        self._layers[self.indices[i]] = layer

    def __iter__(self) -> Iterator:
        return (self._layers[j] for j in self.indices)


class CompressedLayers:
    """What a method sees: `layers` are the compressed layers only (the cache's `compressed` view)."""

    def __init__(self, cache: "CompressedCache", indices: list[int]) -> None:
        self.cache = cache
        self.layers = LayerView(cache.layers, indices)

    def __getattr__(self, name: str):  # everything but `layers` is the cache's
        return getattr(self.cache, name)


class CompressedCache(Cache):
    """The cache of one sample: one layer per decoder layer, of the model's kind (full or local).

    `CompressedCache(num_layers)` is all full-attention layers; `CompressedCache.for_model(config, local_layers)`
    mirrors a model. `compressed_layers` are the layers a method compresses: the full-attention layers, plus the
    local ones when `local_layers == "compress"`."""

    def __init__(self, num_layers: int | None = None, kinds: Sequence[LayerKind] | None = None,
                 local_layers: str = "keep") -> None:
        if local_layers not in LOCAL_LAYERS:
            raise KvbenchError(f"method.local_layers={local_layers!r}: choose one of {', '.join(LOCAL_LAYERS)}")
        kinds = list(kinds) if kinds is not None else [LayerKind()] * num_layers
        super().__init__(layers=[LocalLayer(k) if k.local else CompressibleLayer() for k in kinds])
        self.kinds = kinds
        self.local_layers = local_layers
        self.compressed_layers = [i for i, k in enumerate(kinds) if not k.local or local_layers == "compress"]
        self._rank = {layer: rank for rank, layer in enumerate(self.compressed_layers)}
        self.compressed = CompressedLayers(self, self.compressed_layers)

    @classmethod
    def for_model(cls, config, local_layers: str = "keep") -> "CompressedCache":
        return cls(kinds=layer_kinds(config), local_layers=local_layers)

    @property
    def hybrid(self) -> bool:
        return any(k.local for k in self.kinds)

    def rank(self, layer_idx: int) -> int | None:
        """Index of decoder layer `layer_idx` among the compressed layers (None: not compressed)."""
        return self._rank.get(layer_idx)

    def held_at_prefill(self, layer_idx: int, prompt_len: int) -> int:
        """Prompt tokens the layer holds after the prefill (the last ones): all, or `window - 1` for a local layer."""
        kind = self.kinds[layer_idx]
        return min(prompt_len, kind.window - 1) if kind.local else prompt_len

    def tokens_per_head(self) -> list[int]:
        """Tokens each layer holds per head (layers may differ)."""
        return [layer.held() for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of keys and values held by the cache."""
        return sum(layer.nbytes() for layer in self.layers)

    def any_compressed(self) -> bool:
        return any(getattr(layer, "compressed", False) for layer in self.layers)

    def kept_positions(self) -> list[list[list[int]]]:
        """Original prompt positions held, as [layer][head] lists."""
        return [layer.kept_positions() for layer in self.layers]


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """{name: cache} for a forward call, under the name this transformers version uses."""
    return {_cache_argument(type(model)): cache}
