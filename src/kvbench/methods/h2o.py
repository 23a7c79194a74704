"""H2O as the KV-compression papers run it: one-shot heavy hitters at prefill plus the recent window.

Scores are the attention each prefix token receives, summed over queries, computed in blocks of queries so
that no n x n matrix is ever built. `mode=official` reproduces KVCache-Factory (all queries; the causal mask
only inside the last window block, so earlier queries also "see" later keys); `mode=causal` is the H2O
paper's accumulated causal attention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.base import ScoredMethod, grouped_logits, window_causal_mask

H2O_MODES = ("official", "causal")


@dataclass
class H2O(ScoredMethod):
    name = "h2o"
    window_size: int = 32
    mode: str = "official"
    query_block: int = 512  # queries per block; memory is O(heads * query_block * n)

    def validate(self) -> None:
        super().validate()
        if self.mode not in H2O_MODES:
            raise KvbenchError(f"method.mode={self.mode!r} for h2o: choose one of {', '.join(H2O_MODES)}")
        if self.query_block < 1:
            raise KvbenchError("method.query_block must be at least 1")

    def score(self, layer_idx, queries, keys):
        n = keys.shape[2]
        prefix = n - self.window_size
        total = torch.zeros(queries.shape[1], prefix, dtype=torch.float32, device=keys.device)
        for start in range(0, n, self.query_block):
            rows = torch.arange(start, min(start + self.query_block, n), device=keys.device)
            logits = grouped_logits(queries[:, :, start:start + len(rows)], keys)
            mask = window_causal_mask(rows, n, self.window_size, logits.dtype, self.mode == "causal")
            probs = torch.softmax(logits + mask, dim=-1, dtype=torch.float32).to(queries.dtype)
            total += probs[0, :, :, :prefix].sum(dim=1, dtype=torch.float32)
        return total
