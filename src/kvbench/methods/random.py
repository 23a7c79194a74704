"""Random (kvpress `random_press.py`): uniform random scores, the floor every table should show.

As kvpress, a generator seeded with `seed` (the run seed) is created at every layer, so every layer draws the same
scores (different per KV head); the selection is reproducible across runs and resumptions. Scores are drawn in
float32 on the CPU (kvpress draws in the model dtype, which makes ties in half precision).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.methods.kvpress import KvpressScored


@dataclass
class Random(KvpressScored):
    name = "random"
    display_name = "Random"
    order = 5
    attention_free: ClassVar[bool] = True
    seed: int = 0

    def kv_scores(self, rank, queries, keys, values):
        generator = torch.Generator().manual_seed(int(self.seed))
        return torch.rand(keys.shape[1], keys.shape[2], generator=generator).to(keys.device)
