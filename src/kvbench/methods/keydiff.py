"""KeyDiff (Park et al. 2025; kvpress 0.5.5 `keydiff_press.py`): keep the keys least similar to the layer's average
key direction, per KV head, over the whole prompt (attention-free: no window, queries unused).

Score: minus the cosine similarity of each key with the anchor, the mean of the L2-normalised keys of its KV head.
kvpress's defaults: no window, one list per KV head, `int(n * (1 - compression_ratio))` kept (kvbench.methods.kvpress).
The paper's block-wise iterative eviction is kvpress's `BlockPress` around this press, not this press."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F

from kvbench.methods.kvpress import KvpressScored


@dataclass
class KeyDiff(KvpressScored):
    name = "keydiff"
    display_name = "KeyDiff"
    order = 74
    attention_free: ClassVar[bool] = True  # key directions only

    def kv_scores(self, rank, queries, keys, values):
        anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)
        return -F.cosine_similarity(keys, anchor, dim=-1)[0]
