"""KVzip (Kim et al. 2025; snu-mllab/KVzip, as kvpress `kvzip_press.py` @8bb29b9 runs it): a KV pair matters as
much as the model needs it to reconstruct the context. Query-agnostic by design.

After the prefill (the cache holds the whole prompt), the prompt is fed again in chunks of `chunk_size` tokens,
each after a repeat instruction: `"\\n\\nRepeat the previous context exactly."` (later chunks: `"\\n\\nRepeat the part
of the previous context exactly, starting with"` plus the last `prev_postfix_size` tokens of the previous chunk),
then the chat template's assistant suffix (`"\\n"` without a template), then the chunk. In every layer, the queries
of that pass attend (post-RoPE, softmax in the model dtype) to the keys of the first `min(n_sink, start)` tokens, of
the chunk in the cache, and of the pass itself (causal); a prompt token's score per KV head is the maximum of that
attention over the group's query heads and the pass's queries. The cache is cropped back to the prompt after every
pass. The first `n_sink` tokens start at score 1; the first chunk's pass overwrites them (kvpress's
`prefix_length` is the chat template's preamble, which the engine does not know: here it is 0).

Budget: `L * H_kv * budget` KV pairs kept in all (kvpress: `int(numel * compression_ratio)` pruned), the lowest
scores pruned over all layers and heads together (`layerwise=False`) or per layer (`layerwise=True`). kvpress then
prunes per layer across heads, so heads keep different numbers of tokens; until the per-head cache lands, this
implementation keeps each layer's count split evenly over its KV heads (`head_budgets: uniform`, the floor of
`count / H_kv` each, each head its best by score) and records it. The extra passes run inside the prefill timer: the
prefill time of KVzip includes its reconstruction.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.errors import KvbenchError
from kvbench.methods.base import Method

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
HEAD_BUDGETS = ("uniform",)


def chat_suffix(tokenizer) -> str:
    """The text a chat template puts after the user's message (kvpress's dummy-context split); "\\n" without one."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    return text.split(separator)[1]


def chunk_passes(prompt_ids: torch.Tensor, first: torch.Tensor, nxt: torch.Tensor, suffix: torch.Tensor,
                 chunk_size: int, prev_postfix_size: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, input ids [1, m]) of every reconstruction pass over prompt_ids [1, n]."""
    n = prompt_ids.shape[1]
    passes = []
    for start in range(0, n, chunk_size):
        chunk = prompt_ids[:, start:start + chunk_size]
        if start == 0:
            lead = first
        else:
            lead = torch.cat([nxt, prompt_ids[:, max(start - prev_postfix_size, start - chunk_size):start]], dim=1)
        passes.append((start, start + chunk.shape[1], torch.cat([lead, suffix, chunk], dim=1)))
    return passes


def reconstruction_scores(queries: torch.Tensor, keys: torch.Tensor, start: int, end: int, n_sink: int,
                          block: int = 512) -> torch.Tensor:
    """kvpress `score_kvzip`: queries [1,H,m,d] of a pass, keys [1,H_kv,N,d] (the prompt, then the pass) ->
    [H_kv, end - start]: the max over the group's heads and the pass's queries of the softmax over the keys of the
    first `min(n_sink, start)` tokens, the chunk `start:end` and the pass itself (causal), at the chunk's columns.

    Computed over blocks of `block` queries in float32, never the [H, m, N] matrix at once: a block's queries see
    the pass's keys up to the block's last row only (the rest is masked anyway), and the softmax runs in place
    (max, exp, sum, divide, as torch.softmax), so each block allocates its logits once."""
    heads, m, d = queries.shape[1], queries.shape[2], queries.shape[3]
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    sink = min(n_sink, start)
    scale = math.sqrt(d)
    context = torch.cat([keys[0, :, :sink], keys[0, :, start:end]], dim=1).transpose(-1, -2)  # [H_kv, d, s+c]
    own = keys[0, :, -m:].transpose(-1, -2)  # [H_kv, d, m]
    q = queries[0].view(kv_heads, group, m, d)
    best = torch.zeros(kv_heads, end - start, dtype=torch.float32, device=keys.device)
    for b0 in range(0, m, block):
        b1 = min(b0 + block, m)
        rows = b1 - b0
        qb = q[:, :, b0:b1].reshape(kv_heads, group * rows, d)
        ctx = (qb @ context).float().div_(scale)  # [H_kv, g*b, s+c]
        mine = (qb @ own[..., :b1]).float().div_(scale).view(kv_heads, group, rows, b1)
        future = torch.ones(rows, rows, dtype=torch.bool, device=keys.device).triu_(1)  # only the last columns
        mine[..., b0:].masked_fill_(future, float("-inf"))
        top = torch.maximum(ctx.amax(-1), mine.amax(-1).view(kv_heads, -1))[..., None]  # row max (finite: a row sees its own key)
        ctx.sub_(top).exp_()
        mine.sub_(top.view(kv_heads, group, rows, 1)).exp_()
        total = ctx.sum(-1) + mine.sum(-1).view(kv_heads, -1)
        probs = ctx[..., sink:].div_(total[..., None])
        best = torch.maximum(best, probs.amax(dim=1))
    return best


def prune_counts(scores: torch.Tensor, kept_total: int, layerwise: bool) -> list[int]:
    """KV pairs each layer keeps: scores [L, H_kv, n]; the lowest `numel - kept_total` pruned globally (kvpress),
    or the same number per layer (`layerwise`)."""
    layers, kv_heads, n = scores.shape
    if layerwise:
        return [kept_total // layers] * layers
    pruned = scores.numel() - kept_total
    lowest = torch.topk(-scores.flatten(), pruned).indices
    per_layer = torch.bincount(lowest // (kv_heads * n), minlength=layers)
    return [kv_heads * n - int(c) for c in per_layer]


@dataclass
class KVzip(Method):
    name = "kvzip"
    display_name = "KVzip"
    order = 78
    decode_refusal: ClassVar[str | None] = ("its scores come from passes that reconstruct the context, not from "
                                            "the decoding queries")
    equal_length_layers: ClassVar[bool] = True  # one global ranking over all layers
    needs_model: ClassVar[bool] = True  # the tokenizer and the model's extra passes
    min_window: ClassVar[int] = 0
    window_size: int = 0  # kvpress: none; > 0 keeps the last tokens and ranks the rest
    cache_heads: str = "per_kv_head"  # per_query_head repeats each KV head's selection to its query heads
    n_sink: int = 4
    layerwise: bool = False
    chunk_size: int = 2048
    prev_postfix_size: int = 8
    head_budgets: str = "uniform"

    def validate(self) -> None:
        super().validate()
        if self.head_budgets not in HEAD_BUDGETS:
            raise KvbenchError(f"method.head_budgets={self.head_budgets!r}: only 'uniform' (each KV head keeps "
                               f"the layer's count / H_kv) until the per-head cache lands")
        if self.chunk_size < 1 or self.prev_postfix_size < 0 or self.n_sink < 0:
            raise KvbenchError("method.chunk_size must be >= 1, prev_postfix_size and n_sink >= 0 (kvpress: 2048, 8, 4)")

    def bind(self, model, tokenizer=None) -> None:
        if tokenizer is None:
            raise KvbenchError("kvzip needs the tokenizer for its repeat prompts: method.bind(model, tokenizer)")
        encode = lambda text: torch.tensor([tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)
        self.prompt_ids = encode(FIRST_PROMPT), encode(NEXT_PROMPT), encode(chat_suffix(tokenizer))

    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.recording: tuple[int, int] | None = None
        self.scores: torch.Tensor | None = None

    def after_prefill(self, model, input_ids, cache) -> None:
        n = input_ids.shape[1]
        if self.keeps_all(n):
            return
        if getattr(self, "prompt_ids", None) is None:
            raise KvbenchError("kvzip needs the tokenizer: call method.bind(model, tokenizer) before prefill "
                               "(kvbench's pipeline does)")
        from kvbench.engine import cache_kwargs  # the model's name for the cache argument

        if len(getattr(cache, "compressed_layers", cache.layers)) != len(cache.layers):
            raise KvbenchError("kvzip compresses every layer: models with sliding-window or chunked layers are not "
                               "supported (kvpress refuses Gemma 3 too); use another method on this model")
        layer0 = cache.layers[0]
        self.scores = torch.zeros(self.num_layers, layer0.keys.shape[1], n, dtype=layer0.keys.dtype,
                                  device=input_ids.device)
        self.scores[..., : self.n_sink] = 1.0
        first, nxt, suffix = (ids.to(input_ids.device) for ids in self.prompt_ids)
        for start, end, ids in chunk_passes(input_ids, first, nxt, suffix, self.chunk_size, self.prev_postfix_size):
            self.recording, self.observed = (start, end), set()
            model(input_ids=ids, position_ids=torch.arange(n, n + ids.shape[1], device=ids.device)[None],
                  use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
            for layer in cache.layers:
                layer.crop(n - layer.get_seq_length())
            if len(self.observed) != self.num_layers:
                raise KvbenchError(f"kvzip: the attention wrapper showed {len(self.observed)} of {self.num_layers} "
                                   f"layers of the reconstruction pass (attention.py must call "
                                   f"method.observe_layer on multi-token passes over a filled cache)")
        self.recording = None
        prefix = n - self.window_size  # the window (kvbench's extension; kvpress has none) is always kept
        scores = self.scores[..., :prefix]
        counts = prune_counts(scores, self.num_layers * scores.shape[1] * (self.tokens_budget - self.window_size),
                              self.layerwise)
        for layer_idx, count in enumerate(counts):
            layer = cache.layers[layer_idx]
            order = scores[layer_idx].topk(count // scores.shape[1], dim=-1).indices
            if self.cache_heads == "per_query_head":
                order = order.repeat_interleave(self.group, dim=0)
            self.keep_tokens(cache, layer_idx, order, layer.keys, layer.values)
        self.allocations = [counts]

    def expected_kv_tokens(self, prompt_len: int, shape: dict) -> int:
        """Tokens held after the last prefill: per layer, its count of the global ranking (recorded in
        `allocations`; the counts sum to `L x H_kv x (budget - window)`) split evenly over the KV heads (floor), plus
        the window, times the stored heads. A prompt that fits: every token."""
        probe = copy.copy(self)
        probe.begin(prompt_len, shape["layers"])
        if probe.keeps_all(prompt_len):
            return prompt_len * shape["layers"] * shape["kv_heads"]
        counts = (getattr(self, "allocations", None) or [None])[0]
        if counts is None or len(counts) != shape["layers"] or self.prompt_len != prompt_len:
            raise KvbenchError("KVzip's layer counts depend on the prompt: call expected_kv_tokens after a prefill "
                               "of this prompt length")
        heads = shape["heads"] if self.cache_heads == "per_query_head" else shape["kv_heads"]
        return sum((count // shape["kv_heads"] + self.window_size) * heads for count in counts)

    def observe_layer(self, layer_idx, queries, keys) -> None:
        if self.recording is not None:
            start, end = self.recording
            self.group = queries.shape[1] // keys.shape[1]
            self.observed.add(layer_idx)
            self.scores[layer_idx, :, start:end] = reconstruction_scores(queries, keys, start, end, self.n_sink)
