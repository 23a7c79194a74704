"""The kvpress convention shared by KNorm, TOVA, Expected Attention and random (kvpress `ScorerPress`).

kvpress scores every prompt position per KV head and keeps the top `int(n * (1 - compression_ratio))` per KV head,
with no observation window (`window_size=0`; a window > 0 is kvbench's extension: the last tokens kept, the rest
ranked). Budgets, in the order they apply:
- `compression_ratio` set: kvpress's own rounding, `int(n * (1 - compression_ratio))` tokens per KV head.
- `budget` >= 1: exactly `budget` tokens per head (window included). kvpress with `compression_ratio = 1 - budget/n`
  would keep `int(n * (1 - r))`, which float rounding makes one short for some n (n=1100, b=128 gives 127); we keep
  `budget`, what that ratio intends.
- 0 < `budget` < 1: kvbench's rule for every method, `round(n * budget)` (kvpress's `int()` rounds down instead:
  set `compression_ratio = 1 - budget` for that).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.base import CACHE_HEADS, ScoredMethod


@dataclass
class KvpressScored(ScoredMethod):
    """Score all positions per KV head (`kv_scores`), keep the top-k per head, plus an optional window."""

    min_window: ClassVar[int] = 0
    window_size: int = 0
    cache_heads: str = "per_kv_head"  # kvpress keeps one list per KV head
    compression_ratio: float | None = None  # kvpress semantics; overrides `budget` when set

    def validate(self) -> None:
        if self.compression_ratio is None:
            super().validate()
            return
        if self.cache_heads not in CACHE_HEADS:
            raise KvbenchError(f"method.cache_heads={self.cache_heads!r}: choose one of {', '.join(CACHE_HEADS)}")
        if not 0 <= self.compression_ratio < 1:
            raise KvbenchError(f"method.compression_ratio={self.compression_ratio} must be in [0, 1) "
                               f"(the fraction of the prompt removed, kvpress's convention)")
        if self.window_size < 0:
            raise KvbenchError(f"method.window_size={self.window_size} must be at least 0")

    def resolve_budget(self, prompt_len: int) -> int:
        if self.compression_ratio is not None:
            kept = max(self.window_size, int(prompt_len * (1 - self.compression_ratio)))
            if kept < 1:
                raise KvbenchError(f"method.compression_ratio={self.compression_ratio:g} keeps 0 of this prompt's "
                                   f"{prompt_len} tokens; use a ratio below {1 - 1 / prompt_len:.6g}")
            return kept
        if self.budget < 1:
            return max(self.window_size + 1, round(prompt_len * self.budget))
        return int(self.budget)

    def kv_scores(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor) -> torch.Tensor:
        """[H_kv, n] scores of every prompt position per KV head (higher is kept)."""
        raise NotImplementedError

    def compress_layer(self, layer_idx, queries, keys, values, cache) -> None:
        n = keys.shape[2]
        if self.keeps_all(n):
            return
        prefix = n - self.window_size
        scores = self.kv_scores(layer_idx, queries, keys, values)[:, :prefix]
        if self.cache_heads == "per_query_head":  # the same list for every head of a group
            scores = scores.repeat_interleave(queries.shape[1] // keys.shape[1], dim=0)
        keep = min(self.tokens_budget - self.window_size, prefix)
        self.keep_tokens(cache, layer_idx, scores.topk(keep, dim=-1).indices, keys, values)
