"""FullKV: the uncompressed baseline. Every prompt token stays in the cache."""
from __future__ import annotations

from dataclasses import dataclass

from kvbench.methods.base import Method


@dataclass
class FullKV(Method):
    name = "fullkv"
    display_name = "FullKV"
    order = 0
    decode_refusal = "FullKV keeps every token, so there is nothing to compress"

    def validate(self) -> None:  # no budget to check: FullKV ignores it
        pass

    def resolve_budget(self, prompt_len: int) -> None:
        return None
