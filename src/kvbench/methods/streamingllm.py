"""StreamingLLM (as the KV-compression papers run it): the first `budget - window` tokens ("attention sinks")
plus the last `window` tokens, identical for every head and layer, selected once at prefill."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.base import ScoredMethod


@dataclass
class StreamingLLM(ScoredMethod):
    name = "streamingllm"
    display_name = "StreamingLLM"
    order = 10
    paper_defaults = {"window_size": 32}
    min_window: ClassVar[int] = 1  # the recent window is the method
    attention_free = True  # selects by position: valid whatever the model's attention (soft-caps, sinks)
    window_size: int = 32

    def score(self, rank, queries, keys):
        # Earlier tokens score higher, so the top-k are the first tokens, in position order.
        prefix = keys.shape[2] - self.window_size
        order = -torch.arange(prefix, device=keys.device, dtype=torch.float32)
        return order.expand(queries.shape[1], -1)
