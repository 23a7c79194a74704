"""CriticalKV and CriticalAdaKV (Feng et al. 2025; kvpress 0.5.5 `criticalkv_press.py`): any scorer's scores,
re-weighted by how much each value changes the layer's output.

Per head, the first `int(budget * first_stage_ratio)` tokens are kept by the scorer's own scores; the rest of the
budget goes to the best `(score + epsilon) * ||W_o^h v||_1` (the L1 norm of the value projected by the head's slice
of the output projection, averaged over the query group for `per_kv_head`). `allocation=adaptive` is
`CriticalAdaKVPress`: the head budgets come first (kvpress's AdaKV safeguard on the scorer's scores,
`adaptive_mode=exact`), each head's first stage is `int(count_h * first_stage_ratio)`, and its safeguarded tokens
always stay. Needs the model: its output projections (`bind`); every layer must be compressed (a model whose local
layers are kept is refused). kvpress's evaluation wraps `SnapKVPress`; kvpress warns that Expected Attention should
run with `use_vnorm=false` under CriticalKV.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.kvpress import ScorerWrapper


@dataclass
class CriticalKV(ScorerWrapper):
    name = "criticalkv"
    display_name = "CriticalKV"
    order = 82
    needs_model: ClassVar[bool] = True  # the output projections
    epsilon: float = 1e-4
    first_stage_ratio: float = 0.5

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.first_stage_ratio <= 1:
            raise KvbenchError(f"method.first_stage_ratio={self.first_stage_ratio} must be in [0, 1] (kvpress: 0.5)")

    def bind(self, model, tokenizer=None) -> None:
        super().bind(model, tokenizer)
        self.o_proj = output_projections(model)

    def projected_norms(self, rank: int, values: torch.Tensor, heads: int) -> torch.Tensor:
        """||v W_o^h||_1 per query head [H, n] (kvpress `vwl1norm`), or its group mean [H_kv, n]."""
        norms = value_output_norms(values, layer_weight(self, rank), heads)
        if self.cache_heads == "per_kv_head":
            norms = norms.view(values.shape[1], heads // values.shape[1], -1).mean(dim=1)
        return norms

    def first_stage(self, counts, prefix: int) -> torch.Tensor | int:
        """Tokens each head keeps by the scorer's own scores."""
        if self.allocation == "adaptive":
            floor = int((self.tokens_budget - self.window_size) * self.floor_alpha)
            return torch.clamp((counts * self.first_stage_ratio).long(), min=floor)
        if self.compression_ratio is not None:
            first = int((1 - self.compression_ratio) * (prefix + self.window_size) * self.first_stage_ratio)
        else:
            first = int(int(counts) * self.first_stage_ratio)
        return max(1, first) if self.first_stage_ratio > 0 else 0

    def head_scores(self, rank, queries, keys, values=None):
        self.query_heads = queries.shape[1]
        return super().head_scores(rank, queries, keys, values)

    def select_and_store(self, cache, rank, scores, counts, keys, values) -> None:
        prefix = scores.shape[-1]
        norms = self.projected_norms(rank, values, self.query_heads)[:, :prefix]
        rescored = (scores.float() + self.epsilon) * norms.float()
        first = self.first_stage(counts, prefix)
        if not isinstance(first, torch.Tensor):
            first = torch.full((scores.shape[0],), first, dtype=torch.long)
        order = scores.sort(dim=-1, descending=True).indices
        for h, f in enumerate(first.tolist()):
            rescored[h, order[h, :f]] = float("inf")  # the first stage: kept by the scorer's own scores
        super().select_and_store(cache, rank, rescored, counts, keys, values)


def output_projections(model) -> list[torch.Tensor]:
    """The weight of every attention layer's output projection `o_proj`, in layer order."""
    weights = [m.o_proj.weight for m in model.modules() if isinstance(getattr(m, "o_proj", None), torch.nn.Linear)]
    if not weights:
        raise KvbenchError(f"this method needs the attention output projections (o_proj); {type(model).__name__} "
                           f"has none")
    return weights


def layer_weight(method, rank: int) -> torch.Tensor:
    """The bound `o_proj` weight of a compressed layer; every layer must be compressed (ranks = layer indices)."""
    weights = getattr(method, "o_proj", None)
    if weights is None:
        raise KvbenchError(f"{method.name} needs the model: call method.bind(model) before prefill")
    if len(weights) != method.num_layers:
        raise KvbenchError(f"{method.name} reads each layer's output projection, but {method.num_layers} of "
                           f"{len(weights)} layers are compressed; use method.local_layers=compress or another method "
                           f"on this model")
    return weights[rank]


def value_output_norms(values: torch.Tensor, weight: torch.Tensor, heads: int) -> torch.Tensor:
    """values [1, H_kv, n, d], o_proj weight [hidden, H*d] -> [H, n]: the L1 norm of each value through its query
    head's slice of the output projection (one head at a time: O(n x hidden) memory)."""
    kv_heads, dim = values.shape[1], values.shape[3]
    group = heads // kv_heads
    return torch.stack([(values[0, h // group] @ weight[:, h * dim:(h + 1) * dim].T.to(values.dtype))
                        .abs().sum(dim=-1) for h in range(heads)])
