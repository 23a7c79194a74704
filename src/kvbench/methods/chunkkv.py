"""ChunkKV (Liu et al. 2025; kvpress 0.5.5 `chunkkv_press.py`, `entropy_gated_chunkkv_press.py`): keep whole chunks
of consecutive tokens, ranked by any scorer's scores, the same chunks in every head.

Plain (`ChunkKVPress`): the scorer's scores summed over heads, averaged per chunk of `chunk_length` (a shorter last
chunk averaged alone); the top `max(1, int(chunks * (1 - compression_ratio)))` chunks are kept whole, so a layer
keeps about the budget, not exactly it. A prompt shorter than one chunk: the scorer's own top-k per head.
Entropy-gated (`EntropyGatedChunkKVPress`, `entropy_gated=true`): chunks in score order until the budget is spent;
a chunk with a score at or above the median and a normalised score entropy below the median keeps only its top
`low_entropy_chunk_length` tokens; leftover budget goes to the best remaining tokens. Exactly the budget.
`chunk_length` defaults to the reference's: 20 plain, 10 entropy-gated. With a window (kvbench's extension) the
chunks cover the prefix and the window is kept. Allocation is the chunk rule itself: `allocation=adaptive` is
refused (kvpress's `AdaKVPress` wraps only a `ScorerPress`, which `ChunkKVPress` is not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.kvpress import ScorerWrapper

EPSILON = 1e-8  # entropy_gated_chunkkv_press.py


@dataclass
class ChunkKV(ScorerWrapper):
    name = "chunkkv"
    display_name = "ChunkKV"
    order = 80
    supports_adaptive: ClassVar[bool] = False
    chunk_length: int | None = None  # None: 20 (plain) or 10 (entropy-gated), kvpress's defaults
    entropy_gated: bool = False
    low_entropy_chunk_length: int = 4

    def validate(self) -> None:
        super().validate()
        if self.chunk_length is None:
            self.chunk_length = 10 if self.entropy_gated else 20
        if self.chunk_length < 1:
            raise KvbenchError(f"method.chunk_length={self.chunk_length} must be at least 1 (kvpress: 20)")
        if self.entropy_gated and not self.chunk_length > self.low_entropy_chunk_length >= 1:
            raise KvbenchError(f"entropy-gated ChunkKV needs chunk_length > low_entropy_chunk_length >= 1 (got "
                               f"{self.chunk_length}, {self.low_entropy_chunk_length}; kvpress: 10, 4)")

    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.layer_counts: list[int] = []  # prefix tokens each layer kept (whole chunks: near the budget)

    def kept_fraction(self, prefix: int) -> float:
        return 1 - self.compression_ratio if self.compression_ratio is not None else \
            (self.tokens_budget - self.window_size) / prefix

    def select_and_store(self, cache, rank, scores, counts, keys, values) -> None:
        prefix = scores.shape[-1]
        if self.entropy_gated:
            budget = max(1, int(prefix * (1 - self.compression_ratio))) if self.compression_ratio is not None \
                else int(counts)
            kept = entropy_gated_positions(scores.sum(dim=0).float(), budget, self.chunk_length,
                                           self.low_entropy_chunk_length)
        elif prefix < self.chunk_length:
            super().select_and_store(cache, rank, scores, counts, keys, values)
            self.layer_counts.append(int(counts))
            return
        else:
            kept = chunk_positions(scores.sum(dim=0), self.chunk_length, self.kept_fraction(prefix),
                                   None if self.compression_ratio is not None else int(counts))
        self.layer_counts.append(len(kept))
        self.keep_tokens(cache, rank, kept.expand(scores.shape[0], -1), keys, values)

    def expected_kv_tokens(self, prompt_len: int, shape: dict) -> int:
        """Whole chunks: the prefix tokens each layer kept last sample (recorded), plus the window, per stored
        head."""
        if prompt_len <= self.resolve_budget(prompt_len):
            return prompt_len * shape["layers"] * shape["kv_heads"]
        counts = getattr(self, "layer_counts", None)
        if not counts or len(counts) != shape["layers"] or self.prompt_len != prompt_len:
            raise KvbenchError("ChunkKV keeps whole chunks: call expected_kv_tokens after a prefill of this prompt")
        heads = shape["heads"] if self.cache_heads == "per_query_head" else shape["kv_heads"]
        return sum((count + self.window_size) * heads for count in counts)

    def record(self) -> dict:
        return {**super().record(), "layer_counts": getattr(self, "layer_counts", [])}


def chunk_positions(scores: torch.Tensor, chunk: int, kept_fraction: float, budget: int | None) -> torch.Tensor:
    """ChunkKVPress: scores [P] (summed over heads) -> the sorted positions of the best whole chunks. The chunk
    count is kvpress's `max(1, int(chunks * kept_fraction))`, or with a token `budget` the same in integers
    (`chunks * budget // P`, free of float rounding)."""
    prefix = scores.shape[0]
    complete, rest = divmod(prefix, chunk)
    chunk_scores = scores[: complete * chunk].view(complete, chunk).mean(dim=-1)
    if rest:
        chunk_scores = torch.cat([chunk_scores, scores[-rest:].mean().unsqueeze(0)])
    chunks = complete + (rest > 0)
    kept = max(1, chunks * budget // prefix if budget is not None else int(chunks * kept_fraction))
    starts = chunk_scores.topk(kept).indices * chunk
    return torch.cat([torch.arange(s, min(s + chunk, prefix), device=scores.device) for s in starts.tolist()]).sort()[0]


def entropy_gated_positions(scores: torch.Tensor, budget: int, chunk: int, low_entropy_len: int) -> torch.Tensor:
    """EntropyGatedChunkKVPress: scores [P] (summed over heads, float32) -> exactly `budget` sorted positions."""
    prefix = scores.shape[0]
    complete, rest = divmod(prefix, chunk)
    per_chunk = scores[: complete * chunk].view(complete, chunk)
    chunk_scores = per_chunk.mean(dim=1)
    entropy = normalised_entropy(per_chunk - per_chunk.amin(dim=1, keepdim=True).clamp(max=0.0), chunk)
    if rest:
        tail = scores[complete * chunk:]
        chunk_scores = torch.cat([chunk_scores, tail.mean().unsqueeze(0)])
        if rest == 1:
            tail_entropy = torch.zeros(1, device=scores.device)
        else:
            tail = tail - tail.min().clamp(max=0.0) if (tail < 0).any() else tail
            tail_entropy = normalised_entropy(tail.unsqueeze(0), rest)
        entropy = torch.cat([entropy, tail_entropy])
    high = (chunk_scores >= chunk_scores.median()).tolist()
    spiky = (entropy < entropy.median()).tolist()
    keep = torch.zeros(prefix, dtype=torch.bool, device=scores.device)
    for c in torch.argsort(chunk_scores, descending=True).tolist():
        if budget <= 0:
            break
        start, end = c * chunk, min(c * chunk + chunk, prefix)
        take = min(end - start, budget)
        if high[c] and spiky[c]:
            take = min(take, low_entropy_len)
        if take == end - start:
            keep[start:end] = True
        else:
            keep[torch.topk(scores[start:end], take).indices + start] = True
        budget -= take
    if budget > 0:
        left = (~keep).nonzero().squeeze(-1)
        if left.numel():
            keep[left[torch.topk(scores[left], min(budget, left.numel())).indices]] = True
    return keep.nonzero().squeeze(-1)


def normalised_entropy(rows: torch.Tensor, length: int) -> torch.Tensor:
    """Entropy of each row as a distribution, divided by log(length), clamped to [0, 1]."""
    p = rows / (rows.sum(dim=1, keepdim=True) + EPSILON)
    return (-(p * (p + EPSILON).log()).sum(dim=1) / math.log(length)).clamp(0.0, 1.0)
