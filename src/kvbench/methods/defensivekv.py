"""DefensiveKV and Layer-DefensiveKV (Feng et al., ICLR 2026; FFY0/DefensiveKV @9251b95, a kvpress fork:
`efficient_defensivekv_press.py`, `efficient_layer_defensivekv_press.py`): CriticalKV-style value-weighted window
attention with "defensive aggregation" (the worst case over the window's queries instead of their mean).

Per layer, from the attention of the last `observation_window` queries (causal in the window, fp32 softmax cast
back), prefix columns only, per query head:
1. `avg_pool1d(kernel_size)` along the tokens, each window row rescaled back to its own sum;
2. defensive aggregation: the max over the query group and over the window rows, clamped below at its mean over
   the tokens;
3. times the value's output norm `||v W_o^h||_1` (group mean), divided by its sum over the KV heads;
4. first stage: per KV head, the tokens with the most window attention (mean over group and rows, normalised) until
   their cumulative share reaches `threshold - window_bias` (the token that crosses is not included; at most
   `int((n - w) * keep - w)`), set to the layer's maximum; the window is padded with that maximum.
`window_bias` is, as in the reference, the mean attention row sum over the last `w` *prefix* columns (the reference
slices the window off before summing). DefensiveKV keeps the top `H_kv x budget` of the layer's scores across its
KV heads (AdaKV's allocation with no floor: `floor_alpha=0`, `adaptive_mode=exact`); Layer-DefensiveKV the top
`L x H_kv x budget` across all layers and heads (the window can then be evicted). No window is forced
(`window_size: 0`, kvpress's convention). Needs the model's output projections; every layer must be compressed.
The reference's Triton `vw_l1norm` kernel and its flattened head-wise cache are the same arithmetic as the pure
PyTorch `vwl1norm` in the same file, which the golden cases use (no GPU here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.base import grouped_logits, pool, window_causal_mask
from kvbench.methods.criticalkv import layer_weight, output_projections, value_output_norms
from kvbench.methods.kvpress import KvpressScored


@dataclass
class DefensiveKV(KvpressScored):
    name = "defensivekv"
    display_name = "DefensiveKV"
    decode_refusal: ClassVar[str | None] = ("its scores need the prompt's last window_size queries, and its "
                                           "reference defines no decoding-time cut")
    order = 84
    needs_model: ClassVar[bool] = True  # the output projections
    observation_window: int = 32  # the reference's window_size
    kernel_size: int = 5
    threshold: float = 0.9
    allocation: str = "adaptive"  # across the layer's KV heads, no floor
    floor_alpha: float = 0.0
    adaptive_mode: str = "exact"

    def validate(self) -> None:
        super().validate()
        if self.observation_window < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise KvbenchError(f"method.observation_window={self.observation_window} must be >= 1 and "
                               f"method.kernel_size={self.kernel_size} odd (the reference: 32 and 5)")

    def bind(self, model, tokenizer=None) -> None:
        self.o_proj = output_projections(model)

    def kept_fraction(self, n: int) -> float:
        return 1 - self.compression_ratio if self.compression_ratio is not None else self.tokens_budget / n

    def kv_scores(self, rank, queries, keys, values):
        n, w = keys.shape[2], self.observation_window
        if n <= w:
            raise KvbenchError(f"{self.name}: the prompt ({n} tokens) must be longer than observation_window={w}")
        first_max = int((n - w) * self.kept_fraction(n) - w)
        return defensive_scores(queries, keys, values, layer_weight(self, rank), w, self.kernel_size,
                                self.threshold, first_max)


@dataclass
class LayerDefensiveKV(DefensiveKV):
    name = "layer_defensivekv"
    display_name = "Layer-DefensiveKV"
    order = 85
    equal_length_layers: ClassVar[bool] = True  # one ranking over all layers

    def validate(self) -> None:
        super().validate()
        if self.allocation != "adaptive":
            raise KvbenchError("layer_defensivekv allocates across layers and heads: method.allocation must be "
                               "adaptive (method=defensivekv ranks within each layer)")

    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.layer_scores: list[torch.Tensor] = []

    def allocate(self, rank, scores, prompt_len):
        """None until the last layer; then each (layer, head)'s count in one top-k over every layer's scores."""
        self.layer_scores.append(scores)
        if rank < self.num_layers - 1:
            return None
        stacked = torch.stack(self.layer_scores)  # [L, S, P]
        layers, heads, prefix = stacked.shape
        total = layers * heads * min(self.prefix_budget(rank, prompt_len), prefix)
        winners = stacked.flatten().topk(total).indices
        counts = torch.bincount(winners // prefix, minlength=layers * heads).view(layers, heads)
        self.head_budgets = counts.tolist()
        return counts

    def select_and_store(self, cache, rank, scores, counts, keys, values) -> None:
        if counts is None:
            return  # the layer stays whole until every layer is scored
        for j, layer_scores in enumerate(self.layer_scores):
            layer = cache.layers[j]
            super().select_and_store(cache, j, layer_scores, counts[j], layer.keys, layer.values)


def defensive_scores(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, o_proj: torch.Tensor,
                     window: int, kernel_size: int, threshold: float, first_max: int) -> torch.Tensor:
    """The reference's scores: queries [1,H,n,d], keys/values [1,H_kv,n,d], o_proj [hidden, H*d] -> [H_kv, n]."""
    heads, n = queries.shape[1], keys.shape[2]
    kv_heads, prefix = keys.shape[1], n - window
    group = heads // kv_heads
    logits = grouped_logits(queries[:, :, -window:], keys)
    logits = logits + window_causal_mask(torch.arange(prefix, n, device=keys.device), n, window, logits.dtype, True)
    attn = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)[0, :, :, :prefix]  # [H, w, P]
    window_bias = attn[..., -window:].sum(dim=-1).mean().item()
    share = attn.view(kv_heads, group, window, prefix).mean(dim=1).mean(dim=-2)  # [H_kv, P]
    pooled = pool(attn, kernel_size, "avgpool")
    pooled = pooled / pooled.sum(dim=-1, keepdim=True) * attn.sum(dim=-1, keepdim=True)
    worst = pooled.view(kv_heads, group, window, prefix).amax(dim=1).amax(dim=-2)
    scores = worst.clamp(min=worst.mean(dim=-1, keepdim=True))
    norms = value_output_norms(values[:, :, :prefix], o_proj, heads).view(kv_heads, group, prefix).mean(dim=1)
    scores = scores * (norms / norms.sum(dim=0, keepdim=True))
    share = share / share.sum(dim=-1, keepdim=True)
    ranked, order = share.sort(dim=-1, descending=True)
    counts = (ranked.cumsum(dim=-1) >= threshold - window_bias).int().argmax(dim=-1).clamp(max=first_max)
    first = torch.zeros_like(scores, dtype=torch.bool)
    for h, count in enumerate(counts.tolist()):
        first[h, order[h, :count]] = True
    top = scores.max()
    scores = torch.where(first, top, scores)
    return torch.cat([scores, top.expand(kv_heads, window)], dim=1)
