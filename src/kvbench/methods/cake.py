"""CAKE (Qin et al., ICLR 2025; antgroup/cakekv @c4675ce): layer budgets from each layer's attention preference,
allocated in cascade during prefill, and an eviction indicator that adds the variance of the window attention.

Per layer, from the attention of the last `window_size` queries (causal inside the window, fp32 softmax cast back):
- preference `disp ** (1/tau1) * var ** (1/tau2)`: `disp` the entropy of the prefix columns, `var` their variance over
  the window rows (unbiased) summed over heads and columns;
- eviction indicator `mean + gamma * var` of the window rows, prefix columns, `avg_pool1d(5)`, mean over the query
  group (`per_kv_head`, the reference) or per query head.
The layers share `(budget - window) * L` prefix tokens. Cascading: after each layer l, the total is split over layers
0..l in proportion to their preferences (`adjust_budgets`: cap at the prefix length, spread the excess and the
rounding) and every layer seen so far is cut to its share by its indicator; a layer never grows back, so it ends with
the least of its shares. Not cascading: one split at the last layer. A prompt no longer than `budget + window` is not
compressed (the reference's test, although `budget` includes the window).

tau1/tau2: set explicitly, or looked up in the official `model2tau.json` by `tau_model` and budget; no entry (or no
`tau_model`) gives (1.0, 1.0), pred_cake.py's defaults.

During decoding (`decode_interval`; 1 is the official rule, `CakeDecodingKVCache_LayerWise`): each layer keeps the
prefix budget its last allocation gave it at prefill (capped at n - w; `budget - window` when the prompt was not cut),
with no re-allocation across layers. Once the layer holds more than that budget plus the window, the attention of
the forward's last (at most `window_size`) queries over every held key (softmax, no mask), averaged over those rows,
prefix columns only, avg-pooled over neighbouring *rows* (the cache's order: selected rows in top-k order, then the
newer ones), averaged over the query group, keeps its top `budget` rows (top-k order) followed by the last
`window_size` rows. Quirk kept: a cascade layer cut below its final share grows back to it while decoding.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.methods.base import ScoredMethod, gather_tokens, grouped_logits, window_causal_mask

# experiments/LongBench/config/model2tau.json @c4675ce: (tau1, tau2) by model and cache size.
MODEL2TAU = {
    "llama3.1-8b-128k": {128: (1.6, 0.6), 1024: (1.6, 0.4)},
    "llama2-7b-chat-4k": {128: (0.9, 2.3), 1024: (1.9, 1.8)},
    "llama2-13b-chat-4k": {128: (1.8, 2.0), 1024: (0.5, 0.4)},
    "mistral-0.3-7b-32k": {128: (1.0, 0.8), 1024: (0.8, 0.5)},
    "qwen2.5-7b-instruct": {128: (0.4, 0.6), 1024: (1.5, 0.6)},
}


@dataclass
class CAKE(ScoredMethod):
    name = "cake"
    display_name = "CAKE"
    order = 74
    min_window: ClassVar[int] = 1
    equal_length_layers: ClassVar[bool] = True  # one total split over layers that all hold the prompt
    supports_adaptive: ClassVar[bool] = False  # it allocates across layers itself
    window_size: int = 32
    cache_heads: str = "per_kv_head"
    cascading: bool = True
    gamma: float = 200.0
    tau1: float | None = None
    tau2: float | None = None
    tau_model: str | None = None  # a model2tau.json key, for the official tau values
    kernel_size: int = 5
    decode_refusal: ClassVar[str | None] = None  # its own decoding eviction (antgroup/cakekv), see the docstring

    def validate(self) -> None:
        super().validate()
        if self.tau_model is not None and self.tau_model not in MODEL2TAU:
            raise KvbenchError(f"method.tau_model={self.tau_model!r}: choose one of {', '.join(MODEL2TAU)} or null")
        if (self.tau1 is None) != (self.tau2 is None):
            raise KvbenchError("method.tau1 and method.tau2 go together: set both, or neither (official table)")
        if self.tau1 is not None and (self.tau1 <= 0 or self.tau2 <= 0):
            raise KvbenchError(f"method.tau1={self.tau1}, tau2={self.tau2} must be positive")
        if not math.isfinite(self.gamma) or (self.tau1 is not None and not math.isfinite(self.tau1 * self.tau2)):
            raise KvbenchError(f"method.gamma={self.gamma}, tau1={self.tau1}, tau2={self.tau2} must be finite numbers "
                               f"(the reference uses gamma 200)")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise KvbenchError(f"method.kernel_size={self.kernel_size} must be odd (the reference uses 5)")

    def validate_decoding(self) -> None:
        super().validate_decoding()
        if self.decode_interval is not None and self.decode_style != "kvbench":
            raise KvbenchError("cake compresses during decoding with its own rule (antgroup/cakekv's "
                               "CakeDecodingKVCache_LayerWise), which kvpress does not have: use "
                               "method.decode_style=kvbench")

    def taus(self, cache_size: int) -> tuple[float, float]:
        if self.tau1 is not None:
            return self.tau1, self.tau2
        return MODEL2TAU.get(self.tau_model, {}).get(cache_size, (1.0, 1.0))

    def keeps_all(self, prompt_len: int) -> bool:
        return self.tokens_budget is None or prompt_len <= self.tokens_budget + self.window_size

    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.prefs: list[np.float32] = []
        self.indicators: list[torch.Tensor] = []  # [heads, n - w] per layer
        self.sizes: list[int | None] = []  # prefix tokens each layer holds (None: not cut yet)
        self.allocations: list[list[int]] = []  # the layer budgets of every allocation, for the run record

    def expected_kv_tokens(self, prompt_len: int, shape: dict) -> int:
        """Tokens held after the last prefill: each layer's final prefix count (the least of its cascade shares;
        data-dependent, so read from `sizes`) plus the window, times the stored heads. Their prefix counts sum to
        at most `(budget - window) x L` (exactly that without the cascade). A prompt that fits: every token."""
        probe = copy.copy(self)
        probe.begin(prompt_len, shape["layers"])
        if probe.keeps_all(prompt_len):
            return prompt_len * shape["layers"] * shape["kv_heads"]
        sizes = getattr(self, "sizes", None)
        if not sizes or None in sizes or len(sizes) != shape["layers"] or self.prompt_len != prompt_len:
            raise KvbenchError("CAKE's layer budgets depend on the prompt: call expected_kv_tokens after a prefill "
                               "of this prompt length")
        heads = shape["heads"] if self.cache_heads == "per_query_head" else shape["kv_heads"]
        return sum((size + self.window_size) * heads for size in sizes)

    # The pipeline's steps: score = the layer's preference and eviction indicator; allocate = the cascade's layer
    # budgets (None until the layer is allocated); select + store = cut every allocated layer to its budget.
    def head_scores(self, rank, queries, keys, values=None):
        pref, indicator = self.layer_scores(queries, keys)
        self.prefs.append(pref)
        return self.reduce_heads(indicator, keys.shape[1])

    def allocate(self, rank, scores, prompt_len) -> list[int] | None:
        self.indicators.append(scores)
        self.sizes.append(None)
        if not (self.cascading or rank == self.num_layers - 1):
            return None
        budgets = self.layer_budgets(prompt_len)
        self.allocations.append(budgets)
        return budgets

    def select_and_store(self, cache, rank, scores, counts, keys, values) -> None:
        for j, budget in enumerate(counts or []):
            self.cut(cache, j, min(budget, keys.shape[2] - self.window_size))

    def record(self) -> dict:
        out = super().record()
        if self.decode_interval is not None and self.prompt_len:  # the layers' fixed decoding budgets
            out["decode_prefix_budgets"] = [self.prefix_budget(l) for l in range(self.num_layers)]
        return out

    # ---- decoding (cakekv `CakeDecodingKVCache_LayerWise`, called by `llama_attn_forward_cake` every step) -------
    def prefix_budget(self, rank: int, prompt_len: int | None = None) -> int:
        """Prefix tokens the layer keeps while decoding (the official `hh_size = layer_budget[l]`): its share in the
        last allocation of the prefill, capped at the prompt's prefix; `budget - window` when the prompt was not cut
        (the official `key_size`). Fixed for the sample, whatever the length so far."""
        if self.keeps_all(self.prompt_len):
            return self.tokens_budget - self.window_size
        return min(self.allocations[-1][rank], self.prompt_len - self.window_size)

    def decode_compress_layer(self, rank, queries, keys, values, cache, seq_len) -> None:
        keep, w = self.prefix_budget(rank), self.window_size
        held = keys.shape[2]
        if held <= keep + w:
            return
        queries = queries[:, :, -w:]
        if keys.device.type == "cpu":
            # One product per query head, as the reference's matmul over keys repeated to the query heads: the same
            # float32 bits on CPU, where `grouped_logits` rounds a single row differently and so reorders exact ties
            # of the pooled scores (elsewhere one GEMM per KV head: no launch per head, no exactness claimed).
            group = queries.shape[1] // keys.shape[1]
            logits = torch.stack([q @ keys[0, h // group].T for h, q in enumerate(queries[0])])
            logits = logits / math.sqrt(queries.shape[-1])
        else:
            logits = grouped_logits(queries, keys)[0]
        attn = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)  # [H, m, held]
        scores = attn.mean(dim=-2)[:, : held - w]  # [H, held - w], in row order
        scores = F.avg_pool1d(scores, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        scores = self.reduce_heads(scores, keys.shape[1])
        self.keep_tokens(cache, rank, scores.topk(keep, dim=-1).indices, keys, values)

    def layer_scores(self, queries: torch.Tensor, keys: torch.Tensor) -> tuple[np.float32, torch.Tensor]:
        """The layer's preference (float32 scalar) and eviction indicator [H, n - w]."""
        n, w = keys.shape[2], self.window_size
        tau1, tau2 = self.taus(self.tokens_budget)
        logits = grouped_logits(queries[:, :, -w:], keys)
        logits = logits + window_causal_mask(torch.arange(n - w, n, device=keys.device), n, w, logits.dtype)
        attn = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)[0]  # [H, w, n]
        prefix = attn[:, :, : n - w]
        p32 = prefix.float()
        disp = -torch.sum(p32 * torch.log(p32 + 1e-10))
        var = torch.var(prefix, dim=-2).sum()
        pref = (disp ** (1 / tau1) * var ** (1 / tau2)).float().cpu().numpy()
        indicator = (attn.mean(dim=-2) + self.gamma * attn.var(dim=-2))[:, : n - w]
        indicator = F.avg_pool1d(indicator, self.kernel_size, stride=1, padding=self.kernel_size // 2)
        return pref, indicator

    def layer_budgets(self, n: int) -> list[int]:
        """Budgets of the layers seen so far: shares of the total by preference (numpy float32 as the reference),
        truncated, then `adjust_budgets`."""
        total = (self.tokens_budget - self.window_size) * self.num_layers
        pref_sum = sum(self.prefs)  # left to right, as Python's sum in the reference
        shares = [int(pref / pref_sum * total) for pref in self.prefs]
        return adjust_budgets(shares, total, n - self.window_size)

    def cut(self, cache, rank: int, budget: int) -> None:
        """`CakeprefillKVCache.evcit_layer_kvcache`: keep the top `budget` prefix rows of a layer by its current
        indicator (never more than it holds), in top-k order, then the window; the indicator is cut with them.
        A layer cut before is ranked again over the rows it holds (the same rows, or fewer; re-ranking a tie can
        reorder it, and the order is what decoding pools over)."""
        scores = self.indicators[rank]
        budget = min(budget, scores.shape[-1])
        order = scores.topk(budget, dim=-1).indices
        layer = cache.layers[rank]
        if self.sizes[rank] is None:  # the layer holds the whole prompt
            self.keep_tokens(cache, rank, order, layer.keys, layer.values)
        else:
            held = layer.keys.shape[2]
            window = torch.arange(held - self.window_size, held, device=order.device)
            rows = torch.cat([order, window.expand(order.shape[0], -1)], dim=1)
            layer.replace(*gather_tokens(layer.keys, layer.values, rows), layer.positions.gather(1, rows))
        self.indicators[rank] = scores.gather(-1, order)
        self.sizes[rank] = budget


def adjust_budgets(budgets: list[int], total: int, cap: int) -> list[int]:
    """cakekv `utils.adjust_budgets`: cap every budget at `cap`, spread the excess evenly over the layers below the
    cap (remainder +1 to the first), then spread `total - sum` the same way (adding: over layers below the cap;
    removing: over layers above 1)."""
    b = np.array(budgets, dtype=int)
    excess = int(np.maximum(b - cap, 0).sum())
    b = np.minimum(b, cap)
    if excess > 0:
        valid = b < cap
        if valid.sum() > 0:
            b[valid] += excess // int(valid.sum())
            b[np.where(valid)[0][: excess % int(valid.sum())]] += 1
    diff = total - int(b.sum())
    if diff != 0:
        valid = b < cap if diff > 0 else b > 1
        count = int(valid.sum())
        if count > 0:
            step = int(math.copysign(1, diff))
            b[valid] += step * (abs(diff) // count)
            b[np.where(valid)[0][: abs(diff) % count]] += step
    return b.tolist()
