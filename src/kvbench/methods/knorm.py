"""KNorm (Devoto et al. 2024; kvpress `knorm_press.py`): keep the keys with the lowest L2 norm, per KV head, over
the whole prompt (no window, queries unused)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kvbench.methods.kvpress import KvpressScored


@dataclass
class KNorm(KvpressScored):
    name = "knorm"
    display_name = "KNorm"
    order = 70
    attention_free: ClassVar[bool] = True  # key norms only: fine on soft-capped or sink attention

    def kv_scores(self, rank, queries, keys, values):
        return -keys[0].norm(dim=-1)
