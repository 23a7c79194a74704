"""H2O as the KV-compression papers run it: one-shot heavy hitters at prefill plus the recent window.

Scores are the attention each prefix token receives, summed over queries. `mode=official` reproduces
KVCache-Factory (all queries; the causal mask only inside the last window block, so earlier queries also "see"
later keys); `mode=causal` is the H2O paper's accumulated causal attention.

No n x n matrix is ever built. On CPU in float32 the score is one pass over blocks of query rows
(`single_pass_scores`): the logits of a block come from one GEMM per KV head, and one in-place exp over the block
gives both each row's softmax normaliser and the column sums, so no values are multiplied and no keys repeated
(about 2.4x faster than the two flash-attention passes it replaced). Elsewhere (GPU, half precision, where the
reference rounds the probabilities to the model dtype before summing) the scores are accumulated over blocks of
`query_block` queries (`blocked_scores`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.base import ScoredMethod, grouped_logits, window_causal_mask

H2O_MODES = ("official", "causal")


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

    def score(self, rank, queries, keys, window: int | None = None):
        window = self.window_size if window is None else window
        if queries.device.type == "cpu" and queries.dtype == torch.float32:
            return single_pass_scores(queries, keys, window, self.mode == "causal")
        return blocked_scores(queries, keys, window, self.mode == "causal", self.query_block)

    # ---- decoding (the H2O paper, FMInference/H2O `H2OKVCache_LayerWise`): the attention every held token has
    # received from every query since the prompt, per query head, kept in row order with the layer ------------
    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.accumulated: dict[int, torch.Tensor] = {}  # layer -> [S, H / S, rows]: per query head, row order

    def after_layer(self, rank, queries, keys, cache) -> None:
        if self.decode_interval is None and not self.turn_cuts:
            return
        full = self.score(rank, queries, keys, window=0)  # [H, n]: causal column sums over the prompt
        stored = cache.layers[rank]
        groups = 1 if self.cache_heads == "per_query_head" else queries.shape[1] // keys.shape[1]
        full = full.view(-1, groups, full.shape[-1])
        if stored.positions is not None:  # rows kept, in row order
            full = full.gather(2, stored.positions[:, None, :].expand(-1, groups, -1))
        self.accumulated[rank] = full.float()

    def decode_observe(self, rank: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        """Add the attention of this forward's queries [1,H,m,d] over the layer's held keys [1,S,L,d] (causal
        among the m new tokens) to every held token's accumulated score."""
        acc = self.accumulated[rank]
        m, total = query.shape[2], keys.shape[2]
        logits = grouped_logits(query, keys)
        rows = torch.arange(total - m, total, device=keys.device)
        logits = logits + window_causal_mask(rows, total, m, logits.dtype, full_causal=True)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype).float()[0].sum(dim=1)
        acc = torch.cat([acc, acc.new_zeros(*acc.shape[:2], total - acc.shape[-1])], dim=-1)
        self.accumulated[rank] = acc + probs.view(acc.shape)

    def decode_compress_layer(self, rank, queries, keys, values, cache, seq_len) -> None:
        acc = self.accumulated[rank]
        if keys.shape[2] <= self.window_size:
            return
        scores = acc.mean(dim=1)[:, : keys.shape[2] - self.window_size]  # per stored head
        counts = self.allocate(rank, scores, seq_len)
        if counts >= scores.shape[-1]:
            return
        self.select_and_store(cache, rank, scores, counts, keys, values)
        rows = cache.layers[rank].positions  # rows kept, among the rows held before the cut
        self.accumulated[rank] = acc.gather(2, rows[:, None, :].expand(-1, acc.shape[1], -1))


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


def single_pass_scores(queries: torch.Tensor, keys: torch.Tensor, window: int, causal: bool,
                       rows_per_gemm: int = 64) -> torch.Tensor:
    """The same scores as `blocked_scores` (to float32 rounding) from one pass over the logits, O(n) memory.

    Per block of query rows: one GEMM per KV head over its whole query group (no repeated keys, no values), then
    in place over the block: subtract each row's max, exp, row sums s_i, and the column sums sum_i e_ij / s_i as
    one small GEMM of the weights 1/s against the block. The logits of a block are written once into a reused
    buffer of about `rows_per_gemm` rows per KV head. Causal mode computes only the columns up to the block's last
    row and masks the diagonal square; official mode masks only inside the last window block."""
    _, heads, n, dim = queries.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    block = max(1, -(-rows_per_gemm // group))
    prefix = n - window
    grouped = (queries[0] * (1.0 / math.sqrt(dim))).view(kv_heads, group, n, dim)
    keys_t = keys[0].transpose(-1, -2).contiguous()  # [kv, d, n]: the GEMM runs ~1.5x faster than on a view
    total = torch.zeros(heads, 1, prefix, dtype=torch.float32, device=keys.device)
    buffer = torch.empty(heads * block * n, dtype=queries.dtype, device=keys.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows, cols = stop - start, (stop if causal else n)
        logits = buffer[: heads * rows * cols].view(kv_heads, group * rows, cols)
        torch.bmm(grouped[:, :, start:stop].reshape(kv_heads, group * rows, dim), keys_t[:, :, :cols], out=logits)
        logits = logits.view(heads, rows, cols)
        if causal:  # the keys after a row lie in the block's diagonal square only
            above = torch.ones(rows, rows, dtype=torch.bool, device=keys.device).triu_(1)
            logits[:, :, start:].masked_fill_(above, float("-inf"))
        elif stop > prefix:
            rows_idx = torch.arange(start, stop, device=keys.device)
            logits.masked_fill_(window_causal_mask(rows_idx, n, window, torch.float32) < 0, float("-inf"))
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        weights = logits.sum(dim=-1).reciprocal_().unsqueeze(1)  # [H,1,rows]: 1 / each row's softmax normaliser
        seen = min(cols, prefix)
        total[:, :, :seen] += torch.bmm(weights, logits[:, :, :seen])
    return total.view(heads, prefix)
