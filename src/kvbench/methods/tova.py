"""TOVA (Oren et al. 2024; kvpress `tova_press.py`): the attention the last query pays to each token, averaged
over all query heads, one set per layer.

As kvpress with sdpa (`SnapKVPress.compute_window_attention(..., 1, ...)`): the last (post-RoPE) query against all
n keys, `/ sqrt(d)`, softmax over all n (fp32, cast back), the last column dropped, mean over **all** query heads
(not per group), the same scores for every KV head. kvpress forces the last token in (padded with max + 1): here
that is `window_size=1`, the default; a larger window keeps the last `w` tokens and ranks the rest by the same
last-query attention.

`window_size=0` is the TOVA paper's own rule (schwartz-lab-NLP/TOVA `TOVACache.reduce`): no token is protected, the
last query's attention to every token, its own included, ranks them all. With `decode_interval=1` it is the
paper's algorithm during decoding too: once over the budget, the lowest-scored token is dropped at every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.base import grouped_logits, window_scores
from kvbench.methods.kvpress import KvpressScored


@dataclass
class TOVA(KvpressScored):
    name = "tova"
    display_name = "TOVA"
    order = 72
    min_window: ClassVar[int] = 0
    window_size: int = 1

    def kv_scores(self, rank, queries, keys, values):
        n = keys.shape[2]
        if self.window_size == 0:  # the paper: every token ranked, the last query's own column included
            logits = grouped_logits(queries[:, :, -1:], keys)
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)
            return probs[0, :, 0].mean(dim=0).expand(keys.shape[1], -1)
        last = window_scores(queries, keys, 1)  # [H, n - 1]: attention of the last query, last column dropped
        mean = last.mean(dim=0)[: n - self.window_size]
        padded = mean.new_full((n,), float("inf"))  # the window (never ranked: sliced off by the caller)
        padded[: n - self.window_size] = mean
        return padded.expand(keys.shape[1], -1)
