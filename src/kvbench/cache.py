"""A KV cache whose layers can be compressed after prefill and hold different numbers of tokens.

Each layer stores keys and values after RoPE, exactly as transformers' DynamicLayer does, plus the original
prompt positions of the tokens it kept (for the golden checks and the per-sample logs). After compression in
the official GQA layout (`per_query_head`) a layer holds one key/value row per query head; tokens appended
during decoding arrive with the model's KV heads and are expanded to match.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class CompressibleLayer(DynamicLayer):
    """A DynamicLayer that a method may replace by a selection of its tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.positions: torch.Tensor | None = None  # [heads, kept] original positions of the prompt tokens kept
        self.heads_stored: int | None = None  # number of heads after compression (None: model's KV heads)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.heads_stored is not None and key_states.shape[1] != self.heads_stored:
            groups = self.heads_stored // key_states.shape[1]
            key_states = key_states.repeat_interleave(groups, dim=1)
            value_states = value_states.repeat_interleave(groups, dim=1)
        return super().update(key_states, value_states, *args, **kwargs)

    def replace(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store `keys`/`values` [1, heads, kept, d] that hold the prompt tokens at `positions` [heads, kept]."""
        self.keys, self.values, self.positions = keys.contiguous(), values.contiguous(), positions
        self.heads_stored = keys.shape[1]

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class CompressedCache(Cache):
    """The cache of one sample: one CompressibleLayer per decoder layer."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[CompressibleLayer() for _ in range(num_layers)])

    def tokens_per_head(self) -> list[int | float]:
        """Tokens each layer holds per head (layers may differ; a ragged layer gives its mean over heads)."""
        return [layer.tokens_per_head() if hasattr(layer, "tokens_per_head") else layer.get_seq_length()
                for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of keys and values held by the cache."""
        return sum(layer.nbytes() for layer in self.layers)

    def kept_positions(self) -> list[list[list[int]]]:
        """Original prompt positions kept, as [layer][head] lists (every position where a layer was not compressed)."""
        out = []
        for layer in self.layers:
            if hasattr(layer, "kept_positions"):  # kvbench.ragged.RaggedLayer: one list per head, lengths differ
                out.append(layer.kept_positions())
            elif layer.positions is None:
                heads, n = layer.keys.shape[1], layer.keys.shape[2]
                out.append([list(range(n)) for _ in range(heads)])
            else:
                out.append(layer.positions.tolist())
        return out
