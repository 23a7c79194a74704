"""DynamicKV (Zhou et al., EMNLP 2025 Findings): task-aware per-layer budgets, re-allocated across layers.

Each layer first keeps a temporary maximum of `radio_max * (budget - window)` tokens per head, in score order.
Every `update_interval` layers, a global top-k over the pooled scores of all layers seen so far counts the
winners per layer; the whole-model prefix budget is split in proportion and every layer seen so far is cut to
its new size (a prefix of its score-ordered list, plus the window).

`mode=official` reproduces DreamMr/DynamicKV@8ab3c08 (`DynamicKVClusterV11`) quirks included: the whole-model
constant at intermediate updates, float32 arithmetic in the split, no final update when the depth is not a
multiple of the interval, and duplicated window rows when a layer's new size exceeds what it still holds.
`mode=fixed` caps each new size at what the layer holds (no duplicates) and always re-allocates at the last
layer.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.base import PooledWindowMethod, truncate_layer

DYNAMICKV_MODES = ("official", "fixed")


@dataclass
class DynamicKV(PooledWindowMethod):
    name = "dynamickv"
    display_name = "DynamicKV"
    order = 50
    paper_defaults = {"window_size": 8, "kernel_size": 7, "pooling": "avgpool", "radio_max": 10}
    equal_length_layers: ClassVar[bool] = True  # its global top-k stacks the scores of every compressed layer
    supports_adaptive: ClassVar[bool] = False  # it allocates across layers itself
    decode_refusal = "its budgets are re-allocated across layers while the prefill runs layer by layer"
    radio_max: float = 10.0  # "radio" is the official code's spelling of ratio
    update_interval: int = 4
    mode: str = "official"

    def validate(self) -> None:
        super().validate()
        if self.mode not in DYNAMICKV_MODES:
            raise KvbenchError(f"method.mode={self.mode!r} for dynamickv: choose one of {', '.join(DYNAMICKV_MODES)}")
        if not self.radio_max >= 1:  # nan too
            raise KvbenchError(f"method.radio_max={self.radio_max} must be at least 1 (the paper uses 10; Qwen2 5)")
        if self.update_interval < 1:
            raise KvbenchError(f"method.update_interval={self.update_interval} must be at least 1 (the paper uses 4)")

    def expected_kv_tokens(self, prompt_len: int, shape: dict) -> int:
        """The whole-model prefix budget over the layers re-allocated so far, the temporary maximum in the layers
        after the last update, a window everywhere; for prompts so short that allotments are clipped to the
        prefix, the clipped allotments of the last update this method recorded (official quirk D)."""
        layers = shape["layers"]
        budget = self.resolve_budget(prompt_len)
        if prompt_len <= budget:
            return prompt_len * layers * shape["kv_heads"]
        heads = shape["heads"] if self.cache_heads == "per_query_head" else shape["kv_heads"]
        window = self.window_size
        base, prefix = budget - window, prompt_len - window
        temp_max = min(int(self.radio_max * base), prefix)
        interval = self.update_interval
        last_update = layers - 1 if self.mode == "fixed" else (layers // interval) * interval - 1
        if last_update < 0:
            return (temp_max + window) * layers * heads
        tail = temp_max * (layers - 1 - last_update) + window * layers
        final = getattr(self, "allocations", None)
        if final and temp_max == prefix:
            return (sum(min(size, prefix) for size in final[-1]) + tail) * heads
        return (base * layers + tail) * heads

    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        if self.mode == "official" and num_layers % self.update_interval:
            tail = num_layers % self.update_interval
            warnings.warn(f"dynamickv mode=official on {num_layers} layers: the last {tail} layer(s) are never "
                          f"re-budgeted and keep radio_max x budget tokens (the official code's behaviour when the "
                          f"depth is not a multiple of {self.update_interval}); mode=fixed re-allocates at the last "
                          f"layer", stacklevel=2)
        self.pooled: list[torch.Tensor] = []  # full pooled score map of every layer seen, never pruned
        self.allocations: list[list[int]] = []  # prefix sizes chosen at each update, for the run record

    # score: SnapKV's pooled window scores (inherited).
    def allocate(self, rank, scores, prompt_len) -> int:
        """The layer first keeps the temporary maximum; the scores are kept for the re-allocations."""
        self.pooled.append(scores)
        return min(int(self.radio_max * (self.tokens_budget - self.window_size)), prompt_len - self.window_size)

    def select_and_store(self, cache, rank, scores, counts, keys, values) -> None:
        """Store the layer's top `counts`, then at an update layer cut every layer seen to its new size."""
        super().select_and_store(cache, rank, scores, counts, keys, values)
        if not self.is_update_layer(rank):
            return
        prefix = keys.shape[2] - self.window_size
        sizes = self.reallocate(rank, self.tokens_budget - self.window_size, counts, prefix)
        self.allocations.append(sizes)
        for j, size in enumerate(sizes):
            if self.mode == "fixed":
                size = min(size, cache.layers[j].get_seq_length() - self.window_size)
            truncate_layer(cache, j, min(size, prefix), self.window_size)

    def is_update_layer(self, rank: int) -> bool:
        periodic = rank % self.update_interval == self.update_interval - 1
        return periodic or (self.mode == "fixed" and rank == self.num_layers - 1)

    def reallocate(self, rank: int, base: int, temp_max: int, prefix: int) -> list[int]:
        """New prefix sizes for layers 0..rank (official arithmetic, `dynamic_v11.py:78-114`)."""
        seen = rank + 1
        stacked = torch.stack(self.pooled)  # [seen, heads, prefix]
        heads = stacked.shape[1]
        winners = stacked.flatten().topk(min(base * heads * seen, stacked.numel())).indices
        counts = torch.bincount(winners // (heads * prefix), minlength=seen) // seen
        is_last = rank == self.num_layers - 1
        if is_last and int(counts.sum()) != heads * prefix:
            counts[-1] += base * heads - counts.sum()
        share = counts / counts.sum()  # float32, as the official tensor arithmetic
        sizes = [int((temp_max * share[j]).item()) for j in range(seen)]
        # The official code splits the whole-model budget even at intermediate updates; fixed mode splits
        # what the layers seen so far are owed.
        total = base * (self.num_layers if self.mode == "official" else seen)
        scale = sum(sizes) / total
        sizes = [int(s // scale) for s in sizes]
        sizes[-1] += total - sum(sizes)
        return sizes
