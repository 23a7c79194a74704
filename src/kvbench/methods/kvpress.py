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

These scorers run the shared pipeline (`ScoredMethod.compress_layer`): `kv_scores` is the score step, so
`allocation=adaptive` composes with any of them as kvpress's `AdaKVPress(press)` wraps any `ScorerPress`. Their
adaptive default is `adaptive_mode=kvpress`, kvpress 0.5.5's `AdaKVPress` (`alpha_safeguard` = `floor_alpha`): every
head keeps its own top `max(1, int(n_kept * floor_alpha))` (`base.kvpress_safeguard`), one top-k over all heads fills
the layer to exactly H_kv x budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    adaptive_mode: str = "kvpress"  # kvpress's AdaKVPress safeguard
    compression_ratio: float | None = None  # kvpress semantics; overrides `budget` when set

    @classmethod
    def official_params(cls, params: dict) -> dict:
        """A kvpress golden case's arguments -> our settings: `press: AdaKVPress` with `alpha_safeguard` is
        `allocation=adaptive` with that `floor_alpha` (`adaptive_mode=kvpress`)."""
        params = dict(params)
        if params.pop("press", None) in ("AdaKVPress", "CriticalAdaKVPress"):
            params.update(allocation="adaptive", adaptive_mode="kvpress",
                          floor_alpha=params.pop("alpha_safeguard", 0.2))
        return params

    def validate(self) -> None:
        if self.compression_ratio is None:
            super().validate()
            return
        self.validate_allocation()
        if self.cache_heads not in CACHE_HEADS:
            raise KvbenchError(f"method.cache_heads={self.cache_heads!r}: choose one of {', '.join(CACHE_HEADS)}")
        if not 0 <= self.compression_ratio < 1:
            raise KvbenchError(f"method.compression_ratio={self.compression_ratio} must be in [0, 1) "
                               f"(the fraction of the prompt removed, kvpress's convention)")
        if self.window_size < 0:
            raise KvbenchError(f"method.window_size={self.window_size} must be at least 0")

    def budget_asked(self, prompt_len: int) -> int | None:
        if self.compression_ratio is not None:
            return int(prompt_len * (1 - self.compression_ratio))
        return super().budget_asked(prompt_len)

    def resolve_budget(self, prompt_len: int) -> int:
        if self.compression_ratio is not None:
            kept = max(self.window_size, self.budget_asked(prompt_len))  # never below the window
            if kept < 1:
                raise KvbenchError(f"method.compression_ratio={self.compression_ratio:g} keeps 0 of this prompt's "
                                   f"{prompt_len} tokens; use a ratio below {1 - 1 / prompt_len:.6g}")
            return kept
        return super().resolve_budget(prompt_len)

    def kv_scores(self, rank: int, queries: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor) -> torch.Tensor:
        """[H_kv, n] scores of every prompt position per KV head (higher is kept)."""
        raise NotImplementedError

    def head_scores(self, rank, queries, keys, values=None):
        scores = self.kv_scores(rank, queries, keys, values)[:, : keys.shape[2] - self.window_size]
        if self.cache_heads == "per_query_head":  # the same list for every head of a group
            scores = scores.repeat_interleave(queries.shape[1] // keys.shape[1], dim=0)
        return scores


@dataclass
class ScorerWrapper(KvpressScored):
    """A kvpress-style press around any registered per-layer scorer (kvpress's `ChunkKVPress(press)`,
    `CriticalKVPress(press)`): `scorer` names it, `scorer_params` sets its own settings; the budget, the head
    layout, the allocation and (unless set here) the window are shared. The scorer's `head_scores` is the score
    step; the wrapper changes a later step. The scorer's default is kvbench's `snapkv` (KVCache-Factory's SnapKV,
    where kvpress's evaluation wraps its own `SnapKVPress`: window 64, kernel 5)."""

    scorer: str = "snapkv"
    scorer_params: dict = field(default_factory=dict)
    window_size: int | None = None  # None: the scorer's own window

    def __post_init__(self) -> None:
        from kvbench.methods import registry  # the registry imports no method module: no circle

        spec = registry.get(self.scorer)
        if not issubclass(spec.cls, ScoredMethod) or issubclass(spec.cls, ScorerWrapper) \
                or not spec.cls.supports_adaptive:
            raise KvbenchError(f"method.scorer={self.scorer!r}: {self.name} wraps a per-layer scorer (e.g. snapkv, "
                               f"knorm, tova, expected_attention, h2o), not {self.scorer}")
        clash = sorted(set(self.scorer_params) & {"budget", "cache_heads", "allocation", "compression_ratio"})
        if clash:
            raise KvbenchError(f"method.scorer_params sets {clash}: the wrapper shares them with its scorer; set "
                               f"method.{clash[0]} (or budget=...) instead")
        shared = {"cache_heads": self.cache_heads, "allocation": self.allocation,
                  "budget": self.budget if self.compression_ratio is None else 1 - self.compression_ratio}
        if self.window_size is not None:
            shared["window_size"] = self.window_size
        if "compression_ratio" in spec.settings():
            shared["compression_ratio"] = self.compression_ratio
        self.scorer_params = dict(self.scorer_params)
        self.inner = registry.build(self.scorer, **{**shared, **self.scorer_params})
        self.window_size = self.inner.window_size
        self.min_window = self.inner.min_window
        self.needs_model = type(self).needs_model or self.inner.needs_model  # e.g. over expected_attention
        super().__post_init__()

    def params(self) -> dict:
        return {**super().params(), "scorer_params": self.inner.params()}

    def bind(self, model, tokenizer=None) -> None:
        if self.inner.needs_model:
            self.inner.bind(model, tokenizer)

    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.inner.begin(prompt_len, num_layers)

    def head_scores(self, rank, queries, keys, values=None):
        return self.inner.head_scores(rank, queries, keys, values)
