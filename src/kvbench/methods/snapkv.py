"""SnapKV: the attention the observation window pays to each prefix token, pooled, top-k per head."""
from __future__ import annotations

from dataclasses import dataclass

from kvbench.methods.base import PooledWindowMethod


@dataclass
class SnapKV(PooledWindowMethod):
    name = "snapkv"
    display_name = "SnapKV"
    order = 30
    paper_defaults = {"window_size": 32, "kernel_size": 7, "pooling": "avgpool"}
    window_size: int = 32
