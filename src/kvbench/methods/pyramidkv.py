"""PyramidKV: SnapKV's scores with a per-layer budget that decreases linearly with depth (KVCache-Factory)."""
from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import KvbenchError
from kvbench.methods.base import PooledWindowMethod


@dataclass
class PyramidKV(PooledWindowMethod):
    name = "pyramidkv"
    display_name = "PyramidKV"
    order = 40
    paper_defaults = {"window_size": 8, "kernel_size": 7, "pooling": "avgpool"}
    beta: int = 20

    def validate(self) -> None:
        super().validate()
        if self.beta < 1:
            raise KvbenchError(f"method.beta={self.beta} must be at least 1 (the papers use 20)")

    def prefix_budget(self, rank: int, prompt_len: int) -> int:
        base = self.tokens_budget - self.window_size
        prefix = prompt_len - self.window_size
        if prompt_len < 2 * base and self.allocation == "uniform":
            return base  # KVCache-Factory falls back to a uniform (SnapKV) budget for short prompts; AdaKV does not
        min_num = base // self.beta
        max_num = 2 * base - min_num
        if max_num >= prefix:
            max_num = prefix
            min_num = 2 * base - max_num
        # `steps` is rounded down, so the mean over layers overshoots the budget a little (as the reference).
        steps = (max_num - min_num) // max(self.num_layers - 1, 1)
        return max_num - rank * steps
