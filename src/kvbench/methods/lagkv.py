"""LagKV (Liang et al. 2025; kvpress 0.5.5 `lagkv_press.py`): attention-free scores from lag-relative statistics.

After the first `n_sink` tokens, the prompt is cut into partitions of `lag_size` tokens; each partition is scored
against the next one (its reference): keys and values are min-max normalised with the reference's per-channel
min and max, the standard deviation over the channels is softmaxed over the partition, and the key and value
scores are averaged. Without `cross_scoring` a token's score is its rank within its partition / `lag_size`, so every
partition keeps about the same share. The sinks and the last partition plus the remainder (the tokens no later
partition can reference) score 1 and are kept. A prompt shorter than `n_sink + 2 * lag_size` is ranked by position
(latest first). kvpress's defaults: `n_sink` 4, `lag_size` 128, no window, one list per KV head, top
`int(n * (1 - compression_ratio))` per KV head (kvbench.methods.kvpress)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.kvpress import KvpressScored


def lag_scores(states: torch.Tensor, lag_size: int) -> torch.Tensor:
    """states [H_kv, p, lag, d] (p partitions) -> [H_kv, p - 1, lag]: partition i normalised by partition i + 1's
    per-channel range, std over the channels, softmax over the partition."""
    reference = states[:, 1:]
    low = reference.amin(dim=-2, keepdim=True)
    high = reference.amax(dim=-2, keepdim=True)
    return ((states[:, :-1] - low) / (high - low)).std(dim=-1).softmax(dim=-1)


@dataclass
class LagKV(KvpressScored):
    name = "lagkv"
    display_name = "LagKV"
    order = 75
    attention_free: ClassVar[bool] = True  # keys and values only
    n_sink: int = 4
    lag_size: int = 128
    cross_scoring: bool = False

    def validate(self) -> None:
        super().validate()
        if self.n_sink < 0 or self.lag_size < 1:
            raise KvbenchError(f"method.n_sink={self.n_sink} must be >= 0 and method.lag_size={self.lag_size} >= 1 "
                               f"(kvpress: 4, 128)")

    def kv_scores(self, rank, queries, keys, values):
        kv_heads, n, d = keys.shape[1], keys.shape[2], keys.shape[3]
        sink, lag = self.n_sink, self.lag_size
        if n < sink + 2 * lag:  # too short to compress by lag: the sinks, then later tokens first
            score = torch.ones(kv_heads, n, dtype=keys.dtype, device=keys.device)
            if n > sink:
                score[:, sink:] = (torch.arange(n - sink, device=keys.device) / (n - sink)).to(keys.dtype)
            return score
        end = sink + ((n - sink) // lag) * lag
        shape = (kv_heads, -1, lag, d)
        score = (lag_scores(keys[0, :, sink:end].reshape(shape), lag)
                 + lag_scores(values[0, :, sink:end].reshape(shape), lag)) / 2
        if not self.cross_scoring:
            score = (score.argsort(dim=-1).argsort(dim=-1) / lag).to(keys.dtype)
        ones = lambda count: torch.ones(kv_heads, count, dtype=score.dtype, device=score.device)
        return torch.cat([ones(sink), score.reshape(kv_heads, -1), ones(lag + n - end)], dim=-1)
