"""KVzip (Kim et al. 2025; snu-mllab/KVzip) exactly as kvpress 0.5.5 `kvzip_press.py` runs it: a KV pair matters as
much as the model needs it to reconstruct the context. Query-agnostic by design.

After the prefill (the cache holds the whole prompt), the prompt is fed again in chunks of `chunk_size` tokens,
each after a repeat instruction: `"\\n\\nRepeat the previous context exactly."` (later chunks: `"\\n\\nRepeat the part
of the previous context exactly, starting with"` plus the last `prev_postfix_size` tokens of the previous chunk),
then the chat template's assistant suffix (`"\\n"` without a template), then the chunk. In every layer, the queries
of that pass attend (post-RoPE, softmax in the model dtype) to the keys of the first `min(n_sink, start)` tokens, of
the chunk in the cache, and of the pass itself (causal); a prompt token's score per KV head is the maximum of that
attention over the group's query heads and the pass's queries. KVzip+ (`plus=true`, kvpress's
`kvzip_plus_normalization`) divides each probability by its query row's hidden-state norm and multiplies it by
its key's ||v W_O|| first. The cache is cropped back to the prompt after every pass. Then the first `n_sink`
tokens get the highest score (kvpress 0.5.5: `amax + 1`, so they are always kept).

Selection (kvpress `compress_post`): the lowest `numel - kept` scores over all layers and KV heads together are
pruned (`layerwise=False`; `True`: the same number per layer), counted per layer; each layer then prunes its count
across its KV heads together, so heads keep different numbers of tokens, stored per head in a ragged layer
(`kvbench.ragged`, bytes held = tokens kept). `kept` is exactly `L x H_kv x (budget - window)` for a token budget,
or `numel - int(numel * compression_ratio)` with kvpress's `compression_ratio`. Same tokens as kvpress 0.5.5 on
SmolLM2 on every layer-head (tests/golden/kvpress-0.5.5/, `tests/test_kvzip_kvpress.py`).

Named differences from kvpress, each off by default or with its reason:
- `preamble`: kvpress's pipeline always wraps the context in the chat template and does not reconstruct the
  template's preamble (`prefix_length` tokens, scored 0 but for the sinks). kvbench's prompts carry no preamble
  unless the protocol adds one, so by default every token is reconstructed; `preamble=chat_template` applies
  kvpress's rule to the first tokens of the prompt (what the golden comparison runs).
- `window_size` > 0 (kvbench's extension): the last tokens are kept and the rest ranked.
- `cache_heads=per_query_head` repeats each KV head's selection to its query heads.
The extra passes run inside the prefill timer: the prefill time of KVzip includes its reconstruction.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvbench.cache import cache_kwargs  # the model's name for the cache argument
from kvbench.errors import KvbenchError
from kvbench.methods import registry
from kvbench.methods.base import Method

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
PREAMBLES = ("none", "chat_template")


def chat_split(tokenizer) -> tuple[str, str]:
    """(preamble, suffix): the text a chat template puts before and after the user's message, split as kvpress does
    with a dummy context; ("", "\\n") without a template."""
    if getattr(tokenizer, "chat_template", None) is None:
        return "", "\n"
    dummy = "dummy context"
    separator = "\n" + "#" * len(dummy)
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + separator}],
                                         add_generation_prompt=True, tokenize=False, enable_thinking=False)
    context, suffix = text.split(separator)
    return context.split(dummy)[0], suffix


def chat_suffix(tokenizer) -> str:
    """The text a chat template puts after the user's message (kvpress's dummy-context split); "\\n" without one."""
    return chat_split(tokenizer)[1]


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
                          block: int = 512, plus: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """kvpress `score_kvzip`: queries [1,H,m,d] of a pass, keys [1,H_kv,N,d] (the prompt, then the pass) ->
    [H_kv, end - start]: the max over the group's heads and the pass's queries of the softmax over the keys of the
    first `min(n_sink, start)` tokens, the chunk `start:end` and the pass itself (causal), at the chunk's columns.
    KVzip+ (`plus` = (1 / ||h|| [m] per pass row, ||W_O v|| [H_kv, g, end - start] per chunk column)): each
    probability is divided by its row's hidden-state norm, then multiplied by its column's output norm, before the max.

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
        if plus is not None:
            inv_norm, out_norm = plus
            probs = probs.view(kv_heads, group, rows, -1).mul_(inv_norm[b0:b1, None]).mul_(out_norm[:, :, None])
            probs = probs.view(kv_heads, group * rows, -1)
        best = torch.maximum(best, probs.amax(dim=1))
    return best


def output_norms(o_proj_weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """KVzip+'s column factor ||v W_O||: the norm of what each value [H_kv, c, d] writes into the residual stream
    through each query head of its group -> [H_kv, g, c] (kvpress `_compute_value_output_norm`)."""
    kv_heads, _, d = values.shape
    w = o_proj_weight.view(o_proj_weight.shape[0], kv_heads, -1, d)  # [hidden, H_kv, g, d]
    return torch.einsum("jhgi,hti->hgtj", w, values).norm(dim=-1)


def pruned_per_layer(scores: torch.Tensor, pruned: int) -> list[int]:
    """KV pairs each layer prunes (kvpress `compress_post`, `layerwise=False`): scores [L, H_kv, n]; the lowest
    `pruned` of all layers and heads together, counted per layer."""
    layers, kv_heads, n = scores.shape
    lowest = torch.topk(-scores.reshape(-1), pruned).indices
    return torch.bincount(lowest // (kv_heads * n), minlength=layers).tolist()


def kept_per_head(scores: torch.Tensor, pruned: int) -> list[torch.Tensor]:
    """kvpress's per-layer selection: scores [H_kv, n]; the `pruned` lowest across all heads of the layer together
    are dropped, so heads keep different numbers of tokens. -> the kept positions of each head, ascending."""
    kept = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    kept[torch.topk(-scores.reshape(-1), pruned).indices] = False
    return [row.nonzero()[:, 0] for row in kept.view(scores.shape)]


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
    plus: bool = False  # KVzip+ (kvpress `kvzip_plus_normalization`)
    preamble: str = "none"  # chat_template: kvpress's `prefix_length` (the template's preamble is not reconstructed)
    compression_ratio: float | None = None  # kvpress semantics (int(numel * ratio) pruned); overrides `budget`

    def validate(self) -> None:
        if self.compression_ratio is None:
            super().validate()
        elif not 0 <= self.compression_ratio < 1:
            raise KvbenchError(f"method.compression_ratio={self.compression_ratio} must be in [0, 1) (the fraction "
                               f"of the KV pairs removed, kvpress's convention)")
        elif self.window_size:
            raise KvbenchError("method.compression_ratio is kvpress's budget, which has no window: set "
                               "method.window_size=0 or use budget=<tokens>")
        if self.preamble not in PREAMBLES:
            raise KvbenchError(f"method.preamble={self.preamble!r}: choose one of {', '.join(PREAMBLES)}")
        if self.chunk_size < 1 or self.prev_postfix_size < 0 or self.n_sink < 0:
            raise KvbenchError("method.chunk_size must be >= 1, prev_postfix_size and n_sink >= 0 (kvpress: 2048, 8, 4)")

    def resolve_budget(self, prompt_len: int) -> int:
        if self.compression_ratio is not None:  # tokens per head on average (what keeps_all and the reports read)
            return prompt_len - int(prompt_len * self.compression_ratio)
        return super().resolve_budget(prompt_len)

    def bind(self, model, tokenizer=None) -> None:
        if tokenizer is None:
            raise KvbenchError("kvzip needs the tokenizer for its repeat prompts: method.bind(model, tokenizer)")
        encode = lambda text: torch.tensor([tokenizer.encode(text, add_special_tokens=False)], dtype=torch.long)
        preamble, suffix = chat_split(tokenizer)
        self.prompt_ids = encode(FIRST_PROMPT), encode(NEXT_PROMPT), encode(suffix)
        self.preamble_length = encode(preamble).shape[1] if self.preamble == "chat_template" else 0
        self.attention_modules = None
        if self.plus:
            layers = getattr(getattr(model, "model", None), "layers", None)
            modules = [getattr(layer, "self_attn", None) for layer in layers or []]
            if not modules or any(getattr(m, "o_proj", None) is None for m in modules):
                raise KvbenchError("kvzip method.plus=true needs each decoder layer's self_attn.o_proj (Llama-style "
                                   "models); this model has none: use method.plus=false")
            self.attention_modules = modules

    def begin(self, prompt_len: int, num_layers: int) -> None:
        super().begin(prompt_len, num_layers)
        self.recording: tuple[int, int] | None = None
        self.scores: torch.Tensor | None = None
        self.head_budgets: list[list[int]] | None = None

    def record(self) -> dict:
        heads = getattr(self, "head_budgets", None) or []  # per layer, the tokens each stored head keeps
        return {"allocations": getattr(self, "allocations", []), "head_budgets": heads}

    def kept_total(self, layers: int, kv_heads: int, prefix: int) -> int:
        """KV pairs kept outside the window over `layers` layers and their KV heads: kvpress prunes
        `int(numel * ratio)`; a token budget keeps `layers x H_kv x (budget - window)` exactly."""
        numel = layers * kv_heads * prefix
        if self.compression_ratio is not None:
            return numel - int(numel * self.compression_ratio)
        return min(numel, layers * kv_heads * (self.tokens_budget - self.window_size))

    def after_prefill(self, model, input_ids, cache) -> None:
        n = input_ids.shape[1]
        if self.keeps_all(n):
            return
        if getattr(self, "prompt_ids", None) is None:
            raise KvbenchError("kvzip needs the tokenizer: call method.bind(model, tokenizer) before prefill "
                               "(kvbench's pipeline does)")

        if len(getattr(cache, "compressed_layers", cache.layers)) != len(cache.layers):
            raise KvbenchError("kvzip compresses every layer: models with sliding-window or chunked layers are not "
                               "supported (kvpress refuses Gemma 3 too); use another method on this model")
        layer0 = cache.layers[0]
        self.cache, self.inv_norms = cache, {}
        # kvpress: a zero score for what no pass reconstructs (the preamble), the sinks set above every score below
        self.scores = torch.zeros(self.num_layers, layer0.keys.shape[1], n, dtype=layer0.keys.dtype,
                                  device=input_ids.device)
        first, nxt, suffix = (ids.to(input_ids.device) for ids in self.prompt_ids)
        pre = min(self.preamble_length, n)
        hooks = [m.register_forward_pre_hook(self._hidden_norm(i), with_kwargs=True)
                 for i, m in enumerate(self.attention_modules or [])]
        try:
            for start, end, ids in chunk_passes(input_ids[:, pre:], first, nxt, suffix, self.chunk_size,
                                                self.prev_postfix_size):
                self.recording, self.observed = (pre + start, pre + end), set()
                model(input_ids=ids, position_ids=torch.arange(n, n + ids.shape[1], device=ids.device)[None],
                      use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
                for layer in cache.layers:
                    layer.crop(n - layer.get_seq_length())
                if len(self.observed) != self.num_layers:
                    raise KvbenchError(f"kvzip: the attention wrapper showed {len(self.observed)} of "
                                       f"{self.num_layers} layers of the reconstruction pass (attention.py must call "
                                       f"method.observe_layer on multi-token passes over a filled cache)")
        finally:
            for hook in hooks:
                hook.remove()
            self.recording, self.cache, self.inv_norms = None, None, {}
        self.scores[..., : self.n_sink] = self.scores.amax() + 1.0  # kvpress 0.5.5: the sinks are never pruned
        prefix = n - self.window_size  # the window (kvbench's extension; kvpress has none) is always kept
        scores = self.scores[..., :prefix]
        kv_heads = scores.shape[1]
        if self.layerwise:  # kvpress: int(H_kv * n * ratio) pruned in every layer
            pruned = [kv_heads * prefix - self.kept_total(1, kv_heads, prefix)] * self.num_layers
        else:
            pruned = pruned_per_layer(scores, scores.numel() - self.kept_total(self.num_layers, kv_heads, prefix))
        counts, self.head_budgets = [], []
        for rank, layer_pruned in enumerate(pruned):  # every layer is compressed (checked above): rank == layer_idx
            layer = cache.layers[rank]
            kept = kept_per_head(scores[rank], layer_pruned)
            if self.cache_heads == "per_query_head":
                kept = [idx for idx in kept for _ in range(self.group)]
            self.keep_ragged(cache, rank, kept, layer.keys, layer.values)
            counts.append(kv_heads * prefix - layer_pruned)
            self.head_budgets.append([len(idx) for idx in kept])
        self.allocations = [counts]

    def _hidden_norm(self, layer_idx: int):
        """A pre-hook on attention module `layer_idx` keeping 1 / ||h|| of the pass's rows (KVzip+)."""
        def hook(module, args, kwargs):
            if self.recording is not None:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                self.inv_norms[layer_idx] = 1 / torch.norm(hidden[0], dim=-1)
        return hook

    def expected_kv_tokens(self, prompt_len: int, shape: dict) -> int:
        """Tokens held after the last prefill: the per-head counts of the last sample (recorded in `head_budgets`;
        they sum to the exact total, kvpress's ranking across layers and heads), plus the window in every stored
        head. A prompt that fits: every token."""
        probe = copy.copy(self)
        probe.begin(prompt_len, shape["layers"])
        if probe.keeps_all(prompt_len):
            return prompt_len * shape["layers"] * shape["kv_heads"]
        heads = getattr(self, "head_budgets", None)
        if not heads or len(heads) != shape["layers"] or self.prompt_len != prompt_len:
            raise KvbenchError("KVzip's per-head counts depend on the prompt: call expected_kv_tokens after a "
                               "prefill of this prompt length")
        return sum(sum(counts) + len(counts) * self.window_size for counts in heads)

    def observe_layer(self, rank, queries, keys) -> None:
        if self.recording is not None:
            start, end = self.recording
            self.group = queries.shape[1] // keys.shape[1]
            self.observed.add(rank)
            plus = None
            if self.plus:  # every layer is compressed (after_prefill checks): the rank is the model's layer index
                values = self.cache.layers[rank].values[0, :, start:end]
                weight = self.attention_modules[rank].o_proj.weight
                plus = self.inv_norms[rank], output_norms(weight.to(values.dtype), values)
            self.scores[rank, :, start:end] = reconstruction_scores(queries, keys, start, end, self.n_sink, plus=plus)


# KVzip+ (kvpress `kvzip_plus_normalization=True`; the kvpress maintainers' pick for LongBench): a configuration
registry.register(KVzip, "kvzip_plus", display_name="KVzip+", order=79, preset={"plus": True})
