"""SnapKV: the attention the observation window pays to each prefix token, pooled, top-k per head."""
from __future__ import annotations

from dataclasses import dataclass

from kvbench.methods.base import PooledWindowMethod


@dataclass
class SnapKV(PooledWindowMethod):
    name = "snapkv"
    window_size: int = 32
