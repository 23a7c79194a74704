"""The shared compression mechanism: a method is score -> allocate -> select -> store.

At prefill, every decoder layer hands its post-RoPE queries and keys (model KV heads) and its values to
`Method.compress_layer` after the layer's attention output has been computed with the full keys and values.
For a `ScoredMethod` that is four separate steps:
- score: `head_scores` -> [S, n - window], one row per stored head (the scorer: SnapKV's window attention, H2O's
  accumulated attention, ...);
- allocate: `allocate` -> how many prefix tokens each head keeps. The layer's budget comes from `prefix_budget`
  (uniform, or PyramidKV's per-layer schedule); `allocation=adaptive` then spreads the layer's budget over its
  heads with AdaKV's head-adaptive rule (`head_adaptive_counts`), so "Ada" applies to any scorer;
- select: the top `count` positions of each head;
- store: one dense tensor when every head keeps the same count (`keep_tokens`), a per-head variable-length
  `kvbench.ragged.RaggedLayer` otherwise (bytes held = tokens kept).
`ScoredMethod.compress_layer` is that path, and every scorer runs it: a method changes a step, never the path
(kvpress-style scorers give `kv_scores`; wrappers such as ChunkKV and CriticalKV change select; CAKE, DynamicKV and
Layer-DefensiveKV allocate across layers and cut earlier layers in their select step). What a method needs besides
the path is a declared capability (`needs_model`, `decode_refusal`, `supports_adaptive`, ...), read by the
pipeline, the engine and validation. Outside it: FullKV (scores nothing) and KVzip (scores in passes after the
prefill, `after_prefill`).

Layer numbering: a method sees the compressed layers only. Every per-layer call takes `rank`, the layer's index
among the compressed layers (0 = the first compressed layer), and the `cache` it gets is the compressed view
(`CompressedCache.compressed`), whose `layers[rank]` is that layer. The model's decoder-layer index (`layer_idx`
in attention.py, cache.py and decoding.py) equals the rank only when every layer is compressed.

Conventions (as the KV-compression papers): `budget` is tokens kept per head per layer, the observation window
included; the window (last `window_size` prompt tokens) is always kept and placed after the selected tokens,
which are in descending score order as `torch.topk` returns them.
"""
from __future__ import annotations

import copy
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
ALLOCATIONS = ("uniform", "adaptive")
ADAPTIVE_MODES = ("official", "exact", "kvpress")
DECODE_STYLES = ("kvbench", "kvpress")


@dataclass
class Method:
    """Base class: keeps everything (FullKV). Scorers subclass `ScoredMethod` and provide `score`.

    Class-level facts the registry (`kvbench.methods.registry`) reads: `name` (config and results name),
    `display_name` (tables, plots), `order` (position in reports), `paper_defaults` (settings of the papers'
    experiments, used by the bench), `min_window` (smallest `window_size` the scorer works with)."""

    name: ClassVar[str] = "fullkv"
    display_name: ClassVar[str | None] = None
    order: ClassVar[int] = 100
    paper_defaults: ClassVar[dict] = {}
    budget: float | None = None  # tokens per head per layer incl. window; 0 < budget < 1: fraction of the prompt
    window_size: int = 8
    cache_heads: str = "per_query_head"
    # Sliding-window/chunked layers of hybrid models: "keep" leaves them as the model defines them (bounded) and
    # the budget applies to the full-attention layers; "compress" compresses the tokens they hold too.
    local_layers: str = "keep"
    min_window: ClassVar[int] = 1  # 0 for methods without an observation window (KNorm, the kvpress presses)
    # Capabilities: what a method needs besides score -> allocate -> select -> store, declared here and read by
    # the pipeline, the engine, the attention wrapper and validation (never probed).
    needs_model: ClassVar[bool] = False  # `bind(model, tokenizer)` must run before any prefill
    supports_adaptive: ClassVar[bool] = False  # `allocation=adaptive` (AdaKV's head budgets) applies
    attention_free: ClassVar[bool] = False  # scores ignore attention (valid with soft-capped or sink attention)
    equal_length_layers: ClassVar[bool] = False  # compares scores across layers: all must hold the same tokens
    # Compression during decoding (kvbench.decoding): every `decode_interval` forwards after the prefill, each
    # compressed layer goes back to its budget. None: prefill only. A method that cannot score during decoding
    # says why in `decode_refusal` (None: it can).
    decode_interval: int | None = None
    decode_style: str = "kvbench"  # kvbench, or kvpress: kvpress 0.5.5's query phase and row order (decoding.py)
    decode_refusal: ClassVar[str | None] = "it does not implement decoding-time compression"
    turn_cuts = False  # set by the engine around a multi-turn session: cuts follow the prefill (not a setting)

    def __post_init__(self) -> None:
        self.validate()
        self.validate_decoding()
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
            raise KvbenchError(f"method.window_size={self.window_size} must be at least {self.min_window} for "
                               f"{self.name} (its scores come from the observation window)")
        if self.budget >= 1 and self.budget <= self.window_size:
            raise KvbenchError(
                f"budget={self.budget:g} must be larger than method.window_size={self.window_size}: the window is "
                f"part of the budget; raise the budget or lower method.window_size"
            )

    def validate_decoding(self) -> None:
        """`decode_interval`: a positive integer, on a method that can score during decoding."""
        interval = self.decode_interval
        if self.decode_style not in DECODE_STYLES:
            raise KvbenchError(f"method.decode_style={self.decode_style!r}: choose kvbench (each buffered query at "
                               f"its own rotary phase; rows: selection, then window) or kvpress (kvpress 0.5.5's "
                               f"DecodingPress: current token's phase, rows in top-k order)")
        if interval is None:
            if self.decode_style != "kvbench":
                raise KvbenchError("method.decode_style applies to decoding-time compression only: set "
                                   "method.decode_interval too, or drop decode_style")
            return
        if self.decode_style == "kvpress" and getattr(self, "allocation", "uniform") != "uniform":
            raise KvbenchError("method.decode_style=kvpress needs method.allocation=uniform (kvpress's AdaKVPress "
                               "masks keys instead of evicting them during decoding)")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise KvbenchError(f"method.decode_interval={interval!r} must be a positive integer (tokens generated "
                               f"between two compressions) or null (compress at prefill only)")
        if self.decode_refusal:
            raise KvbenchError(f"method {self.name} cannot compress during decoding: {self.decode_refusal}; drop "
                               f"method.decode_interval")

    def params(self) -> dict:
        """All settings of the method, for the run record (adaptive-allocation settings only when used; the decode
        schedule only when set, so prefill-only runs keep their fingerprint)."""
        out = {"name": self.name, **dataclasses.asdict(self)}
        if getattr(self, "asked_ratio", None) is not None:  # asked as a ratio (methods.method_from_config)
            out["compression_ratio"] = self.asked_ratio
        if out.get("decode_interval") is None:
            out.pop("decode_interval", None)
            out.pop("decode_style", None)
        if out.get("allocation") == "uniform":
            for key in ("allocation", "floor_alpha", "adaptive_mode"):
                out.pop(key, None)
        return out

    @classmethod
    def official_params(cls, params: dict) -> dict:
        """A golden case's official arguments -> our settings (default: the same names and values)."""
        return dict(params)

    def record(self) -> dict:
        """What the method chose for the last sample (e.g. per-layer or per-head budgets), for the run record.
        By default a method's `allocations` attribute, if it has one."""
        return {"allocations": self.allocations} if hasattr(self, "allocations") else {}

    def expected_kv_tokens(self, prompt_len: int, shape: dict) -> int:
        """Tokens held after prefill summed over layers and stored heads, from the method's budget rules
        (`shape`: layers, heads, kv_heads). FullKV: every token in every KV head."""
        return prompt_len * shape["layers"] * shape["kv_heads"]

    # ---- per-sample state ------------------------------------------------------------------------------------
    def begin(self, prompt_len: int, num_layers: int) -> None:
        """Reset per-sample state before a prefill (methods keep no state across samples)."""
        self.prompt_len, self.num_layers = prompt_len, num_layers
        self.tokens_budget = self.resolve_budget(prompt_len)

    def resolve_budget(self, prompt_len: int) -> int:
        """Budget in tokens for this prompt: a fraction < 1 is `round(prompt_len * budget)` (`budget_asked`), as
        KVCache-Factory's `max_capacity_prompts_ratio`, but never below window + 1."""
        asked = self.budget_asked(prompt_len)
        return int(self.budget) if asked is None else max(self.window_size + 1, asked)

    def budget_asked(self, prompt_len: int) -> int | None:
        """The tokens a budget relative to the prompt (a fraction) asks of this prompt, before `resolve_budget`
        holds it at the method's minimum; None for a budget in tokens (held as given)."""
        return round(prompt_len * self.budget) if self.budget is not None and self.budget < 1 else None

    def budget_fields(self, prompt_len: int) -> dict:
        """A prediction line's budget for a compressed prompt (agnostic: context) of `prompt_len` tokens:
        `budget_tokens` held and, where the method's minimum held more than the budget asked, `budget_asked` and
        `budget_clamped` (SnapKV budget=0.03125 on 1,000 tokens asks 31 and holds window + 1 = 33)."""
        held, asked = self.resolve_budget(prompt_len), self.budget_asked(prompt_len)
        clamped = held is not None and asked is not None and asked < held
        return {"budget_tokens": held, **({"budget_asked": asked, "budget_clamped": True} if clamped else {})}

    def keeps_all(self, prompt_len: int) -> bool:
        """A prompt no longer than the budget is left whole (identical to FullKV)."""
        return self.tokens_budget is None or prompt_len <= self.tokens_budget

    def compress_layer(self, rank: int, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       cache: CompressedCache) -> None:
        """Called once per layer at prefill with queries [1,H,n,d], keys/values [1,H_kv,n,d]."""

    def decode_compress_layer(self, rank: int, queries: torch.Tensor, keys: torch.Tensor,
                              values: torch.Tensor, cache: CompressedCache, seq_len: int) -> None:
        """A decoding-time cut of one dense layer (kvbench.decoding): `queries` [1,H,m,d] are the buffered queries
        of the last m tokens the layer holds, `keys`/`values` [1,S,L,d] everything it holds (S stored heads),
        `seq_len` the tokens seen so far (prompt + generated). The layer goes back to the budget a prefill of
        `seq_len` tokens would give it. Methods with `decode_refusal` never get here."""
        raise NotImplementedError

    # ---- methods that need the model (`needs_model`: Expected Attention's rotary embedding, KVzip's passes) ----
    def bind(self, model, tokenizer=None) -> None:
        """Called once per run, before any prefill, with the loaded model and tokenizer when `needs_model`."""

    def after_prefill(self, model, input_ids: torch.Tensor, cache: CompressedCache) -> None:
        """Called by the engine right after the prefill forward pass, inside the compression context and the
        prefill timer: a method that needs extra forward passes over the prompt runs them here."""

    def observe_layer(self, rank: int, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """Multi-token forward passes over an already filled cache inside the compression context (e.g. KVzip's
        reconstruction passes from `after_prefill`) show each layer's post-RoPE queries [1,H,m,d] and all its keys
        [1,H_kv,n+m,d] here."""

    # ---- helpers shared by the methods -----------------------------------------------------------------------
    def reduce_heads(self, scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
        """[H, P] per-query-head scores -> the heads that select: unchanged (official layout) or the mean over
        each query group (`per_kv_head`, KV-head granularity, H/H_kv times less memory)."""
        if self.cache_heads == "per_query_head":
            return scores
        return scores.view(num_kv_heads, -1, scores.shape[-1]).mean(dim=1)

    def keep_tokens(self, cache: CompressedCache, rank: int, prefix_idx: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor) -> None:
        """Store the selected prefix tokens `prefix_idx` [heads, k] (in the given order) followed by the window."""
        n, heads = keys.shape[2], prefix_idx.shape[0]
        window = torch.arange(n - self.window_size, n, device=keys.device).expand(heads, -1)
        positions = torch.cat([prefix_idx, window], dim=1)
        cache.layers[rank].replace(*gather_tokens(keys, values, positions), positions)

    def keep_ragged(self, cache: CompressedCache, rank: int, prefix_idx: list[torch.Tensor],
                    keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store head s's own selection `prefix_idx[s]` (lengths may differ) followed by the window, in a
        per-head variable-length layer."""
        from kvbench.ragged import store_ragged

        n = keys.shape[2]
        window = torch.arange(n - self.window_size, n, device=keys.device)
        store_ragged(cache, rank, keys, values, [torch.cat([idx, window]) for idx in prefix_idx])


def store_kvpress_order(cache: CompressedCache, rank: int, scores: torch.Tensor, keep: int, keys: torch.Tensor,
                        values: torch.Tensor, window: int) -> None:
    """kvpress's `ScorerPress.compress` row order: one top-k over every row's score with the window padded at
    max + 1, so the window comes first (in top-k's tie order), then the `keep` selected rows by descending score."""
    padded = torch.cat([scores, scores.new_full((scores.shape[0], window), scores.max().item() + 1)], dim=1)
    rows = padded.topk(keep + window, dim=-1).indices
    cache.layers[rank].replace(*gather_tokens(keys, values, rows), rows)


def gather_tokens(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
    """keys/values [1,H_kv,n,d] and positions [heads,k] (heads = H_kv or a multiple) -> [1,heads,k,d] each.
    Head h reads KV head h // (heads / H_kv): the official `repeat_kv` layout without building it."""
    heads, kv_heads = positions.shape[0], keys.shape[1]
    kv_of_head = torch.arange(heads, device=keys.device) // (heads // kv_heads)
    rows = kv_of_head[:, None]
    return keys[0, rows, positions].unsqueeze(0), values[0, rows, positions].unsqueeze(0)


def truncate_layer(cache: CompressedCache, rank: int, keep: int, window_size: int) -> None:
    """Keep the first `keep` rows of a score-ordered layer plus its last `window_size` rows (the window).
    Like the official DynamicKV code, `keep` larger than the selected part slices into the window, which is then
    appended again (duplicates); callers that want no duplicates cap `keep` first."""
    layer = cache.layers[rank]
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
    fp32 softmax cast back to the model dtype, summed over the window queries, prefix columns only -> [H, n-w].
    During decoding fewer than `window` queries may be buffered (`queries` are those of the last m tokens): the
    last min(m, window) observe."""
    n = keys.shape[2]
    observed = min(window, queries.shape[2])
    logits = grouped_logits(queries[:, :, -observed:], keys)
    rows = torch.arange(n - observed, n, device=keys.device)
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
    """Score every prefix token per head, allocate each head a number of tokens, keep its top ones plus the
    window. Subclasses provide `score` (and may change the layer budget with `prefix_budget`)."""

    min_window: ClassVar[int] = 0  # a scorer may rank every prompt token (no observation window)
    supports_adaptive: ClassVar[bool] = True  # False where the method allocates across layers itself
    decode_refusal: ClassVar[str | None] = None  # its scorer runs on the buffered decoding queries

    allocation: str = "uniform"  # uniform: every head keeps the layer's budget; adaptive: AdaKV across heads
    floor_alpha: float = 0.2  # adaptive: share of the layer budget every head keeps at least (AdaKV's alpha)
    adaptive_mode: str = "official"  # adaptive: official (FFY0/AdaKV), exact (sums to the budget), kvpress (AdaKVPress)

    def validate(self) -> None:
        super().validate()
        self.validate_allocation()

    def validate_allocation(self) -> None:
        if self.allocation == "adaptive" and not self.supports_adaptive:
            raise KvbenchError(f"method.allocation=adaptive does not apply to {self.name}: it allocates its budget "
                               f"itself; use method.allocation=uniform")
        if self.allocation not in ALLOCATIONS:
            raise KvbenchError(f"method.allocation={self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}")
        if self.adaptive_mode not in ADAPTIVE_MODES:
            raise KvbenchError(f"method.adaptive_mode={self.adaptive_mode!r}: choose one of "
                               f"{', '.join(ADAPTIVE_MODES)}")
        if not 0 <= self.floor_alpha <= 1:
            raise KvbenchError(f"method.floor_alpha={self.floor_alpha} must be between 0 and 1 (AdaKV uses 0.2)")

    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.head_budgets: list[list[int] | None] = [None] * num_layers  # adaptive: prefix tokens per head

    def record(self) -> dict:
        if self.allocation != "adaptive":
            return super().record()
        return {**super().record(), "head_budgets": getattr(self, "head_budgets", [])}

    # ---- score ---------------------------------------------------------------------------------------------
    def score(self, rank: int, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[H, n - window] scores per query head (higher is kept)."""
        raise NotImplementedError

    def head_scores(self, rank: int, queries: torch.Tensor, keys: torch.Tensor,
                    values: torch.Tensor | None = None) -> torch.Tensor:
        """[S, n - window]: the scores of the heads that select (S = H, or H_kv for `per_kv_head`). Scorers that
        read the values (kvpress-style `kv_scores`) take them here."""
        return self.reduce_heads(self.score(rank, queries, keys), keys.shape[1])

    # ---- allocate ------------------------------------------------------------------------------------------
    def prefix_budget(self, rank: int, prompt_len: int) -> int:
        """Budget policy: prefix tokens (outside the window) each head of this layer keeps. Uniform by default."""
        return self.tokens_budget - self.window_size

    def allocate(self, rank: int, scores: torch.Tensor, prompt_len: int) -> int | torch.Tensor:
        """Prefix tokens to keep: one count for every head (uniform) or a count per head [S] (adaptive)."""
        prefix = scores.shape[-1]
        if self.allocation == "uniform":
            return min(self.prefix_budget(rank, prompt_len), prefix)
        counts = head_adaptive_counts(scores, self.prefix_budget(rank, prompt_len), self.floor_alpha,
                                      self.adaptive_mode, self.window_size)
        self.head_budgets[rank] = counts.tolist()
        return counts

    # ---- select + store ------------------------------------------------------------------------------------
    def select_and_store(self, cache, rank, scores, counts, keys, values) -> None:
        if isinstance(counts, int) or bool((counts == counts[0]).all()):
            keep = int(counts) if isinstance(counts, int) else int(counts[0])
            self.keep_tokens(cache, rank, scores.topk(keep, dim=-1).indices, keys, values)
            return
        order = scores.sort(dim=-1, descending=True).indices  # AdaKV: the first cap_h of a descending sort
        self.keep_ragged(cache, rank, [order[h, :c] for h, c in enumerate(counts.tolist())], keys, values)

    def compress_layer(self, rank, queries, keys, values, cache) -> None:
        """The one path of every scorer: score -> allocate -> select -> store (subclasses change the steps)."""
        n = keys.shape[2]
        if not self.keeps_all(n):
            scores = self.head_scores(rank, queries, keys, values)
            counts = self.allocate(rank, scores, n)
            self.select_and_store(cache, rank, scores, counts, keys, values)
        self.after_layer(rank, queries, keys, cache)

    def after_layer(self, rank, queries, keys, cache) -> None:
        """After a layer's prefill compression (or none, when it fits the budget): per-layer state a method keeps
        for its decoding-time cuts (H2O's accumulated attention). Default: nothing."""

    def decode_compress_layer(self, rank, queries, keys, values, cache, seq_len) -> None:
        """The same score -> allocate -> select -> store over what the layer holds, with the layer budgets of a
        prefill of `seq_len` tokens (uniform: `tokens_budget`; PyramidKV: its schedule)."""
        if keys.shape[2] <= self.window_size:
            return
        scores = self.head_scores(rank, queries, keys, values)
        counts = self.allocate(rank, scores, seq_len)
        if isinstance(counts, int) and counts >= scores.shape[-1]:
            return  # the layer is within its budget
        if self.decode_style == "kvpress":
            store_kvpress_order(cache, rank, scores, counts, keys, values, self.window_size)
            return
        self.select_and_store(cache, rank, scores, counts, keys, values)

    def expected_kv_tokens(self, prompt_len: int, shape: dict) -> int:
        """Uniform: (min(layer budget, prefix) + window) x stored heads per layer. Adaptive: the per-head counts
        the last sample recorded (data-dependent), plus the window in every head."""
        layers = shape["layers"]
        probe = copy.copy(self)
        probe.begin(prompt_len, layers)
        if probe.keeps_all(prompt_len):
            return prompt_len * layers * shape["kv_heads"]
        heads = shape["heads"] if self.cache_heads == "per_query_head" else shape["kv_heads"]
        prefix = prompt_len - self.window_size
        if self.allocation == "adaptive" and getattr(self, "head_budgets", None) and None not in self.head_budgets:
            return sum(sum(counts) + len(counts) * self.window_size for counts in self.head_budgets)
        return sum((min(probe.prefix_budget(i, prompt_len), prefix) + self.window_size) * heads
                   for i in range(layers))


def head_adaptive_counts(scores: torch.Tensor, budget: int, floor_alpha: float, mode: str = "official",
                         window: int = 0):
    """AdaKV's allocation: how many of its prefix tokens each of the S heads of a layer keeps, for a layer
    budget of `budget` prefix tokens per head on average. scores [S, P] -> counts [S] (long).

    `official` (FFY0/AdaKV `AdaptiveSnapKVCluster`): one top-k of S x budget over all heads' scores together
    counts c_h per head; cap_h = round(c_h * (1 - alpha) + int(budget * alpha)) in float32 (half to even). Each
    head is rounded on its own and the floor is truncated, so a layer keeps S x budget - S x frac(budget * alpha)
    tokens give or take S/2: more or fewer than S x budget (SmolLM2: up to 2 either way). A budget above the
    prefix keeps everything.
    `exact` (kvbench's): every head keeps its own top int(budget * alpha) prefix tokens (the floor, counted outside
    the window), and one top-k over the remaining scores of all heads fills the layer to exactly S x budget.
    `kvpress` (kvpress 0.5.5 `AdaKVPress`): the same fill, with kvpress's floor `kvpress_safeguard`."""
    heads, prefix = scores.shape
    if budget > prefix:
        return torch.full((heads,), prefix, dtype=torch.long, device=scores.device)
    floor = kvpress_safeguard(budget, window, floor_alpha) if mode == "kvpress" else int(budget * floor_alpha)
    if mode == "official":
        winners = scores.flatten().topk(heads * budget).indices
        counts = torch.bincount(winners // prefix, minlength=heads)
        return torch.round(counts.to(torch.float32) * (1 - floor_alpha) + floor).long()
    boosted = scores.float().clone()
    if floor:
        boosted.scatter_(1, scores.topk(floor, dim=-1).indices, float("inf"))
    winners = boosted.flatten().topk(heads * budget).indices
    return torch.bincount(winners // prefix, minlength=heads)


def kvpress_safeguard(budget: int, window: int, alpha: float) -> int:
    """kvpress's AdaKVPress floor in prefix tokens: every head keeps its top `int(n_kept * alpha)` positions (at
    least 1 when alpha > 0), n_kept = budget + window counting the window, which its scorers rank first (SnapKV pads
    the window with max + 1), so the window takes the first `window` of them."""
    n_kept = budget + window
    n_safe = int(n_kept * alpha)
    if alpha > 0 and n_kept > 0:
        n_safe = max(1, n_safe)
    return max(0, n_safe - window)


@dataclass
class PooledWindowMethod(ScoredMethod):
    """Window scoring with 1-D pooling (SnapKV, PyramidKV)."""

    min_window: ClassVar[int] = 1
    kernel_size: int = 7
    pooling: str = "avgpool"

    def validate(self) -> None:
        super().validate()
        validate_pooling(self.kernel_size, self.pooling)

    def score(self, rank, queries, keys):
        raw = window_scores(queries, keys, self.window_size)
        return pool(raw.unsqueeze(0), self.kernel_size, self.pooling)[0]

    def head_scores(self, rank, queries, keys, values=None):
        if self.allocation != "adaptive":
            return super().head_scores(rank, queries, keys, values)
        # AdaKV's order (`calcul_attn_sore`): mean over the window rows, the group mean (GQA support) *before*
        # pooling. Scores are compared across heads, so the float rounding of that order matters at near-ties.
        raw = self.reduce_heads(window_scores(queries, keys, self.window_size) / self.window_size, keys.shape[1])
        return pool(raw.unsqueeze(0), self.kernel_size, self.pooling)[0]
