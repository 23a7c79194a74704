"""H2O as the KV-compression papers run it: one-shot heavy hitters at prefill plus the recent window.

Scores are the attention each prefix token receives, summed over queries. `mode=official` reproduces
KVCache-Factory (all queries; the causal mask only inside the last window block, so earlier queries also "see"
later keys); `mode=causal` is the H2O paper's accumulated causal attention.

No n x n matrix is ever built. On CPU in float32 the score is two passes of PyTorch's fused flash-attention
kernel: the first gives each query row's log-normaliser (logsumexp), the second runs attention "transposed"
(keys as queries, queries as keys, minus each row's logsumexp as a bias), whose logsumexp per key is then the
log of the column sum of the softmax: sum_i exp(q_i.k_j - lse_i) = sum_i p_ij. Elsewhere (GPU, half precision)
the scores are accumulated over blocks of `query_block` queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.base import ScoredMethod, grouped_logits, window_causal_mask

H2O_MODES = ("official", "causal")
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class H2O(ScoredMethod):
    name = "h2o"
    display_name = "H2O"
    order = 20
    paper_defaults = {"window_size": 32}
    min_window = 1
    window_size: int = 32
    mode: str = "official"
    query_block: int = 512  # queries per block on the blocked path; memory is O(heads * query_block * n)
    decode_refusal = None  # mode=causal only (validate_decoding): the paper's accumulated attention
    decode_settings: ClassVar[dict] = {"mode": "causal"}  # what decoding-time compression needs (tests read it)

    def validate(self) -> None:
        super().validate()
        if self.mode not in H2O_MODES:
            raise KvbenchError(f"method.mode={self.mode!r} for h2o: choose one of {', '.join(H2O_MODES)}")
        if self.query_block < 1:
            raise KvbenchError("method.query_block must be at least 1")

    def validate_decoding(self) -> None:
        super().validate_decoding()
        if self.decode_interval is None:
            return
        if self.mode != "causal":
            raise KvbenchError("h2o compresses during decoding with the paper's accumulated causal attention only: "
                               "set method.mode=causal (the official mode's window-block mask has no decoding form)")
        if self.local_layers != "keep":
            raise KvbenchError("h2o during decoding accumulates scores row by row, which sliding-window layers "
                               "drop on their own: use method.local_layers=keep")
        if self.allocation != "uniform" or self.decode_style != "kvbench":
            raise KvbenchError("h2o during decoding keeps per-head accumulated scores for a uniform allocation: "
                               "use method.allocation=uniform and method.decode_style=kvbench")

    def score(self, layer_idx, queries, keys, window: int | None = None):
        window = self.window_size if window is None else window
        if _FLASH_CPU is not None and queries.device.type == "cpu" and queries.dtype == torch.float32:
            return fused_scores(queries, keys, window, self.mode == "causal")
        return blocked_scores(queries, keys, window, self.mode == "causal", self.query_block)

    # ---- decoding (the H2O paper, FMInference/H2O `H2OKVCache_LayerWise`): the attention every held token has
    # received from every query since the prompt, per query head, kept in row order with the layer ------------
    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.accumulated: dict[int, torch.Tensor] = {}  # layer -> [S, H / S, rows]: per query head, row order

    def after_layer(self, layer_idx, queries, keys, cache) -> None:
        if self.decode_interval is None:
            return
        full = self.score(layer_idx, queries, keys, window=0)  # [H, n]: causal column sums over the prompt
        stored = cache.layers[layer_idx]
        groups = 1 if self.cache_heads == "per_query_head" else queries.shape[1] // keys.shape[1]
        full = full.view(-1, groups, full.shape[-1])
        if stored.positions is not None:  # rows kept, in row order
            full = full.gather(2, stored.positions[:, None, :].expand(-1, groups, -1))
        self.accumulated[layer_idx] = full.float()

    def decode_observe(self, layer_idx: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        """Add the attention of this forward's queries [1,H,m,d] over the layer's held keys [1,S,L,d] (causal
        among the m new tokens) to every held token's accumulated score."""
        acc = self.accumulated[layer_idx]
        m, total = query.shape[2], keys.shape[2]
        logits = grouped_logits(query, keys)
        rows = torch.arange(total - m, total, device=keys.device)
        logits = logits + window_causal_mask(rows, total, m, logits.dtype, full_causal=True)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype).float()[0].sum(dim=1)
        acc = torch.cat([acc, acc.new_zeros(*acc.shape[:2], total - acc.shape[-1])], dim=-1)
        self.accumulated[layer_idx] = acc + probs.view(acc.shape)

    def decode_compress_layer(self, layer_idx, queries, keys, values, cache, seq_len) -> None:
        acc = self.accumulated[layer_idx]
        if keys.shape[2] <= self.window_size:
            return
        scores = acc.mean(dim=1)[:, : keys.shape[2] - self.window_size]  # per stored head
        counts = self.allocate(layer_idx, scores, seq_len)
        if counts >= scores.shape[-1]:
            return
        self.select_and_store(cache, layer_idx, scores, counts, keys, values)
        rows = cache.layers[layer_idx].positions  # rows kept, among the rows held before the cut
        self.accumulated[layer_idx] = acc.gather(2, rows[:, None, :].expand(-1, acc.shape[1], -1))


def blocked_scores(queries: torch.Tensor, keys: torch.Tensor, window: int, causal: bool,
                   query_block: int) -> torch.Tensor:
    """[H, n - window] summed softmax over blocks of queries (softmax in fp32, cast to the model dtype)."""
    n = keys.shape[2]
    prefix = n - window
    total = torch.zeros(queries.shape[1], prefix, dtype=torch.float32, device=keys.device)
    for start in range(0, n, query_block):
        rows = torch.arange(start, min(start + query_block, n), device=keys.device)
        logits = grouped_logits(queries[:, :, start:start + len(rows)], keys)
        # Official mode masks only rows inside the last window: earlier blocks need no mask at all.
        if causal or rows[-1] >= n - window:
            logits = logits + window_causal_mask(rows, n, window, logits.dtype, causal)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)
        total += probs[0, :, :, :prefix].sum(dim=1, dtype=torch.float32)
    return total


def fused_scores(queries: torch.Tensor, keys: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """The same scores as `blocked_scores` (to float32 rounding) from two flash-attention passes, O(n) memory."""
    heads, n, dim = queries.shape[1], keys.shape[2], keys.shape[3]
    scale = 1.0 / math.sqrt(dim)
    keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)  # [1,H,n,d]: the kernel wants equal heads
    unused_values = torch.zeros_like(queries)  # the kernel needs values; only its logsumexp output is used
    _, row_lse = _FLASH_CPU(queries, keys, unused_values, 0.0, causal, scale=scale)
    row_lse = row_lse.contiguous()  # [1,H,n]
    if not causal:
        # Official mode: the last `window` rows are causal (their masked keys all lie in the window block).
        row_lse[:, :, n - window:] = _window_rows_lse(queries, keys, window, scale)
    bias = (-row_lse).unsqueeze(2)  # [1,H,1,n]: a per-key bias for the transposed pass
    if causal:
        # Key j is seen by queries i >= j: reversing both sequences makes that an ordinary causal mask.
        flipped = (keys.flip(2), queries.flip(2), unused_values, 0.0, True)
        _, col_lse = _FLASH_CPU(*flipped, attn_mask=bias.flip(3).contiguous(), scale=scale)
        col_lse = col_lse.flip(-1)
    else:
        # Rows in the window may not see later window keys, but every prefix key j < n - window is before them.
        _, col_lse = _FLASH_CPU(keys, queries, unused_values, 0.0, False, attn_mask=bias.contiguous(), scale=scale)
    return col_lse[0, :, : n - window].exp()


def _window_rows_lse(queries: torch.Tensor, keys: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """logsumexp of the last `window` query rows under a causal mask -> [1,H,window]."""
    n = keys.shape[2]
    logits = torch.matmul(queries[:, :, n - window:], keys.transpose(-1, -2)) * scale
    rows = torch.arange(n - window, n, device=keys.device)
    future = torch.arange(n, device=keys.device)[None, :] > rows[:, None]
    return torch.logsumexp(logits.masked_fill(future, float("-inf")), dim=-1)
