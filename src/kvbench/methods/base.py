"""The shared compression mechanism: a method is a scoring function plus a budget policy.

At prefill, every decoder layer hands its post-RoPE queries and keys (model KV heads) and its values to
`Method.compress_layer` after the layer's attention output has been computed with the full keys and values.
The method decides which prompt tokens each head keeps; `keep_tokens` gathers them into the cache.

Conventions (as the KV-compression papers): `budget` is tokens kept per head per layer, the observation window
included; the window (last `window_size` prompt tokens) is always kept and placed after the selected tokens,
which are in descending score order as `torch.topk` returns them.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbench.cache import LOCAL_LAYERS, CompressedCache
from kvbench.errors import KvbenchError

CACHE_HEADS = ("per_query_head", "per_kv_head")
POOLINGS = ("avgpool", "maxpool")


@dataclass
class Method:
    """Base class: keeps everything. Subclasses override `compress_layer` (or, usually, `score`)."""

    name: ClassVar[str] = "fullkv"
    budget: float | None = None  # tokens per head per layer incl. window; 0 < budget < 1: fraction of the prompt
    window_size: int = 8
    cache_heads: str = "per_query_head"
    # Sliding-window/chunked layers of hybrid models: "keep" leaves them as the model defines them (bounded) and
    # the budget applies to the full-attention layers; "compress" compresses the tokens they hold too.
    local_layers: str = "keep"
    min_window: ClassVar[int] = 1  # 0 for methods without an observation window (KNorm, the kvpress presses)

    def __post_init__(self) -> None:
        self.validate()
        self.prompt_len = 0
        self.num_layers = 0
        self.tokens_budget: int | None = None

    # ---- configuration -------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Reject settings that cannot work, at start-up rather than mid-run."""
        if self.cache_heads not in CACHE_HEADS:
            raise KvbenchError(f"method.cache_heads={self.cache_heads!r}: choose one of {', '.join(CACHE_HEADS)}")
        if self.local_layers not in LOCAL_LAYERS:
            raise KvbenchError(f"method.local_layers={self.local_layers!r}: choose one of {', '.join(LOCAL_LAYERS)}")
        if self.budget is None:
            raise KvbenchError(f"method {self.name} needs a budget: add budget=<tokens> (e.g. budget=128)")
        if self.budget <= 0:
            raise KvbenchError(f"budget={self.budget} must be positive (tokens, or a fraction of the prompt < 1)")
        if self.window_size < self.min_window:
            raise KvbenchError(f"method.window_size={self.window_size} must be at least {self.min_window}")
        if self.budget >= 1 and self.budget <= self.window_size:
            raise KvbenchError(
                f"budget={self.budget:g} must be larger than method.window_size={self.window_size}: the window is "
                f"part of the budget; raise the budget or lower method.window_size"
            )

    def params(self) -> dict:
        """All settings of the method, for the run record."""
        return {"name": self.name, **dataclasses.asdict(self)}

    # ---- per-sample state ------------------------------------------------------------------------------------
    def begin(self, prompt_len: int, num_layers: int) -> None:
        """Reset per-sample state before a prefill (methods keep no state across samples)."""
        self.prompt_len, self.num_layers = prompt_len, num_layers
        self.tokens_budget = self.resolve_budget(prompt_len)

    def resolve_budget(self, prompt_len: int) -> int:
        """Budget in tokens for this prompt: a fraction < 1 is `round(prompt_len * budget)`, as KVCache-Factory's
        `max_capacity_prompts_ratio`, but never below window + 1."""
        if self.budget < 1:
            return max(self.window_size + 1, round(prompt_len * self.budget))
        return int(self.budget)

    def keeps_all(self, prompt_len: int) -> bool:
        """A prompt no longer than the budget is left whole (identical to FullKV)."""
        return self.tokens_budget is None or prompt_len <= self.tokens_budget

    def compress_layer(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       cache: CompressedCache) -> None:
        """Called once per layer at prefill with queries [1,H,n,d], keys/values [1,H_kv,n,d]."""

    # ---- methods that need the model (Expected Attention: its rotary embedding; KVzip: extra passes) ----------
    def bind(self, model, tokenizer=None) -> None:
        """Called once per run with the loaded model and tokenizer, before any prefill. Default: not needed."""

    def after_prefill(self, model, input_ids: torch.Tensor, cache: CompressedCache) -> None:
        """Called by the engine right after the prefill forward pass, inside the compression context and the
        prefill timer: a method that needs extra forward passes over the prompt runs them here."""

    def observe_layer(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """Multi-token forward passes over an already filled cache inside the compression context (e.g. KVzip's
        reconstruction passes from `after_prefill`) show each layer's post-RoPE queries [1,H,m,d] and all its keys
        [1,H_kv,n+m,d] here."""

    # ---- helpers shared by the methods -----------------------------------------------------------------------
    def selection_heads(self, queries: torch.Tensor, keys: torch.Tensor) -> int:
        return queries.shape[1] if self.cache_heads == "per_query_head" else keys.shape[1]

    def reduce_heads(self, scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """[H, P] per-query-head scores -> the heads that select: unchanged (official layout) or the mean over
        each query group (`per_kv_head`, KV-head granularity, H/H_kv times less memory)."""
        if self.cache_heads == "per_query_head":
            return scores
        return scores.view(num_kv_heads, -1, scores.shape[-1]).mean(dim=1)

    def keep_tokens(self, cache: CompressedCache, layer_idx: int, prefix_idx: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor) -> None:
        """Store the selected prefix tokens `prefix_idx` [heads, k] (in the given order) followed by the window."""
        n, heads = keys.shape[2], prefix_idx.shape[0]
        window = torch.arange(n - self.window_size, n, device=keys.device).expand(heads, -1)
        positions = torch.cat([prefix_idx, window], dim=1)
        cache.layers[layer_idx].replace(*gather_tokens(keys, values, positions), positions)


def gather_tokens(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
    """keys/values [1,H_kv,n,d] and positions [heads,k] (heads = H_kv or a multiple) -> [1,heads,k,d] each.
    Head h reads KV head h // (heads / H_kv): the official `repeat_kv` layout without building it."""
    heads, kv_heads = positions.shape[0], keys.shape[1]
    kv_of_head = torch.arange(heads, device=keys.device) // (heads // kv_heads)
    rows = kv_of_head[:, None]
    return keys[0, rows, positions].unsqueeze(0), values[0, rows, positions].unsqueeze(0)


def truncate_layer(cache: CompressedCache, layer_idx: int, keep: int, window_size: int) -> None:
    """Keep the first `keep` rows of a score-ordered layer plus its last `window_size` rows (the window).
    Like the official DynamicKV code, `keep` larger than the selected part slices into the window, which is then
    appended again (duplicates); callers that want no duplicates cap `keep` first."""
    layer = cache.layers[layer_idx]
    keys = torch.cat([layer.keys[:, :, :keep], layer.keys[:, :, -window_size:]], dim=2)
    values = torch.cat([layer.values[:, :, :keep], layer.values[:, :, -window_size:]], dim=2)
    positions = torch.cat([layer.positions[:, :keep], layer.positions[:, -window_size:]], dim=1)
    layer.replace(keys, values, positions)


# ---- scoring primitives ---------------------------------------------------------------------------------------
def grouped_logits(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q [1,H,m,d] x k [1,H_kv,n,d] -> [1,H,m,n] scaled logits, each query head against its KV head,
    without materialising repeated keys."""
    _, heads, m, dim = queries.shape
    kv_heads = keys.shape[1]
    # One GEMM per KV head over its whole query group ([kv, group*m, d] x [kv, d, n]): about 3x faster on CPU
    # than a broadcast matmul over [kv, group, m, d], which copies the keys once per query head.
    q = queries.reshape(kv_heads, (heads // kv_heads) * m, dim)
    logits = torch.bmm(q, keys[0].transpose(-1, -2)) / math.sqrt(dim)
    return logits.view(1, heads, m, keys.shape[2])


def window_causal_mask(rows: torch.Tensor, n: int, window: int, dtype: torch.dtype, full_causal: bool = False):
    """Additive mask [len(rows), n] for query rows `rows`: large negative where key > query, applied inside the
    last window block only (the reference's quirk) unless `full_causal`."""
    cols = torch.arange(n, device=rows.device)
    future = cols[None, :] > rows[:, None]
    if not full_causal:
        future &= (rows[:, None] >= n - window) & (cols[None, :] >= n - window)
    return torch.zeros(future.shape, dtype=dtype, device=rows.device).masked_fill(future, torch.finfo(dtype).min)


def window_scores(queries: torch.Tensor, keys: torch.Tensor, window: int) -> torch.Tensor:
    """SnapKV's observation-window score: attention of the last `window` queries (causal inside the window),
    fp32 softmax cast back to the model dtype, summed over the window queries, prefix columns only -> [H, n-w]."""
    n = keys.shape[2]
    logits = grouped_logits(queries[:, :, -window:], keys)
    rows = torch.arange(n - window, n, device=keys.device)
    logits = logits + window_causal_mask(rows, n, window, logits.dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(queries.dtype)
    return probs[0, :, :, : n - window].sum(dim=1)


def pool(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the token axis, stride 1, 'same' padding (avg counts the zero padding)."""
    if pooling == "avgpool":
        return F.avg_pool1d(scores, kernel_size, stride=1, padding=kernel_size // 2)
    return F.max_pool1d(scores, kernel_size, stride=1, padding=kernel_size // 2)


def validate_pooling(kernel_size: int, pooling: str) -> None:
    if pooling not in POOLINGS:
        raise KvbenchError(f"method.pooling={pooling!r}: choose avgpool or maxpool")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise KvbenchError(
            f"method.kernel_size={kernel_size} must be odd (an even kernel makes the pooled scores one longer "
            f"than the prefix and selects a token that does not exist); the papers use 7"
        )


@dataclass
class ScoredMethod(Method):
    """Score every prefix token per head, keep the top `prefix_budget` per head plus the window."""

    def score(self, layer_idx: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[H, n - window] scores per query head (higher is kept)."""
        raise NotImplementedError

    def prefix_budget(self, layer_idx: int, prompt_len: int) -> int:
        """Budget policy: prefix tokens (outside the window) each head of this layer keeps. Uniform by default."""
        return self.tokens_budget - self.window_size

    def compress_layer(self, layer_idx, queries, keys, values, cache) -> None:
        n = keys.shape[2]
        if self.keeps_all(n):
            return
        scores = self.reduce_heads(self.score(layer_idx, queries, keys), keys.shape[1])
        keep = min(self.prefix_budget(layer_idx, n), n - self.window_size)
        self.keep_tokens(cache, layer_idx, scores.topk(keep, dim=-1).indices, keys, values)


@dataclass
class PooledWindowMethod(ScoredMethod):
    """Window scoring with 1-D pooling (SnapKV, PyramidKV)."""

    kernel_size: int = 7
    pooling: str = "avgpool"

    def validate(self) -> None:
        super().validate()
        validate_pooling(self.kernel_size, self.pooling)

    def score(self, layer_idx, queries, keys):
        raw = window_scores(queries, keys, self.window_size)
        return pool(raw.unsqueeze(0), self.kernel_size, self.pooling)[0]
