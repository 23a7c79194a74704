"""Cache layers that hold a different number of tokens per head, and attention over them.

Hot-path contract (engine, attention, cache, ragged): a `RaggedLayer` is one layer of a `CompressedCache`, put
there by `store_ragged` (a method's store step) or by a decoding-time cut, and found only through the cache
(`cache.layers[layer_idx]`; no global table). The attention wrapper calls its `attend` for the phases after the
prefill; this module keeps no global state and knows nothing of sessions, phases or methods.

A head-adaptive method (AdaKV) keeps `c_h` prompt tokens in head `h` of a layer. `RaggedLayer` stores exactly
those tokens and nothing else: the kept prompt tokens of every head back to back in one flat tensor
(`prefix_keys` [T, d], T = sum of c_h; `cu_seqlens` [S+1] marks where each of the S stored heads starts, the
FlashAttention varlen convention), plus the tokens appended after compression (decoding, or a question prefilled
after the context) in a dense tail `[1, S, t, d]`, since every head receives every new token. Bytes held =
(T + S * t) * d * element size * 2, exactly: no padding, no granularity.

The prefix is written once and never copied again; appending costs what transformers' DynamicLayer costs (one
`torch.cat` of the tail). The layer's `update` returns its flat prefix keys/values; the attention wrapper, which
finds the layer in the session's cache, calls `RaggedLayer.attend` instead of the backend.

Attention over a ragged layer (`ragged_attention`): query heads are grouped by the stored head they read (one
group per head for the official `per_query_head` layout, `H / H_kv` query heads per KV head for `per_kv_head`).
- CUDA with flash-attn installed, fp16/bf16: `flash_attn_varlen_func` over the prefix with the stored heads as the
  varlen batch (each "sequence" is one head's kept tokens; its query heads are the varlen heads), merged with the
  tail's attention through the log-sum-exp.
- Elsewhere, pure PyTorch: one GEMM of the flat prefix keys against all heads' queries, other heads' tokens
  masked (a temporary [T, S] mask; nothing padded is stored), a per-head softmax and a second GEMM, combined with
  the tail's dense attention through the log-sum-exp. Exact against a dense masked reference (tested).
"""
from __future__ import annotations

import importlib.util
import math

import torch
from transformers.cache_utils import DynamicLayer

_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


class RaggedLayer(DynamicLayer):
    """One decoder layer's cache with `lengths[s]` kept prompt tokens in stored head `s`, plus a dense tail."""

    compressed = True

    def __init__(self, keys: list[torch.Tensor] | torch.Tensor, values, positions: list[torch.Tensor],
                 lengths: torch.Tensor | None = None, offset: int = 0) -> None:
        """`keys`/`values`: per stored head [c_h, d] tensors (or the flat [T, d] with `lengths`); `positions`: per
        head the original prompt positions of those tokens."""
        super().__init__()
        if lengths is None:
            lengths = torch.tensor([k.shape[0] for k in keys], dtype=torch.long)
            keys, values = torch.cat(list(keys)), torch.cat(list(values))
        device = keys.device
        self.lengths = lengths.to(device=device, dtype=torch.long)
        self.heads_stored = int(self.lengths.numel())
        self.prefix_keys, self.prefix_values = keys.contiguous(), values.contiguous()
        self.cu_seqlens = torch.cat([self.lengths.new_zeros(1), self.lengths.cumsum(0)]).to(torch.int32)
        self._foreign: torch.Tensor | None = None  # [S, T] bool, built on first use by the PyTorch path
        self.max_length = int(self.lengths.max()) if self.heads_stored else 0
        self.positions = [p.tolist() if torch.is_tensor(p) else list(p) for p in positions]
        self.offset = offset  # prompt position of the first token the method was given
        d = keys.shape[-1]
        self.tail_keys = keys.new_zeros(1, self.heads_stored, 0, d)
        self.tail_values = values.new_zeros(1, self.heads_stored, 0, d)
        self.keys, self.values = self.prefix_keys, self.prefix_values
        self.dtype, self.device = keys.dtype, device
        self.is_initialized = True

    # ---- the cache-layer interface ---------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens [1, H_in, m, d] to every stored head (expanded to the stored heads when the model
        hands KV heads to a per-query-head layer); returns the flat prefix (the wrapper attends with `attend`)."""
        if key_states.shape[1] != self.heads_stored:
            groups = self.heads_stored // key_states.shape[1]
            key_states = key_states.repeat_interleave(groups, dim=1)
            value_states = value_states.repeat_interleave(groups, dim=1)
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=-2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=-2)
        return self.prefix_keys, self.prefix_values

    def get_seq_length(self) -> int:
        """The longest head (what a mask would have to cover)."""
        return self.max_length + self.tail_keys.shape[-2]

    def crop(self, max_length: int) -> None:
        """Drop the newest tokens of the tail (transformers' `crop` convention: a negative `max_length` removes
        that many tokens, a positive one keeps that many in all). The compressed prefix is never cut: ask-many
        (query-agnostic) restores a layer to its post-compression state this way."""
        tail = self.tail_keys.shape[-2]
        drop = -max_length if max_length < 0 else self.get_seq_length() - max_length
        if drop <= 0:
            return
        if drop > tail:
            raise ValueError(f"cannot crop {drop} tokens from a ragged layer whose tail holds {tail}: the "
                             f"compressed prompt tokens are not croppable")
        self.tail_keys = self.tail_keys[..., : tail - drop, :]
        self.tail_values = self.tail_values[..., : tail - drop, :]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def tokens(self) -> int:
        """Tokens held, summed over the stored heads."""
        return int(self.prefix_keys.shape[0]) + self.heads_stored * self.tail_keys.shape[-2]

    def tokens_per_head(self) -> float:
        return self.tokens() / max(self.heads_stored, 1)

    def held(self) -> float:
        """Tokens per head, the mean over heads (heads hold different counts)."""
        return self.tokens_per_head()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.prefix_keys, self.prefix_values, self.tail_keys, self.tail_values))

    def kept_positions(self) -> list[list[int]]:
        return [[q + self.offset for q in p] for p in self.positions]

    def foreign(self) -> torch.Tensor:
        """[S, T] bool: flat prefix token t belongs to another head than s. Index metadata for the PyTorch path
        (S x T bytes, not counted in `nbytes`: e.g. 1.8% of SmolLM2's float32 KV bytes), built once per layer."""
        if self._foreign is None:
            segment = torch.repeat_interleave(torch.arange(self.heads_stored, device=self.device), self.lengths)
            self._foreign = segment[None, :] != torch.arange(self.heads_stored, device=self.device)[:, None]
        return self._foreign

    def attend(self, query: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
        """Attention of `query` [1, H, m, d] (the last m tokens appended) -> [1, m, H, d], as the backends return."""
        flash = (_HAS_FLASH and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
                 and self.prefix_keys.shape[0] > 0)
        return ragged_attention(query, self.prefix_keys, self.prefix_values, None if flash else self.foreign(),
                                self.cu_seqlens, self.max_length, self.tail_keys, self.tail_values, scaling)


def store_ragged(cache, rank: int, keys: torch.Tensor, values: torch.Tensor,
                 positions: list[torch.Tensor]) -> RaggedLayer:
    """Replace layer `cache.layers[rank]` (a method's view of the compressed layers, `CompressedCache.compressed`)
    by a ragged layer holding, for stored head s, the prompt tokens at `positions[s]` of keys/values [1, H_kv, n, d]
    (head s reads KV head s // (S / H_kv))."""
    heads, kv_heads = len(positions), keys.shape[1]
    previous = cache.layers[rank]
    if getattr(getattr(previous, "kind", None), "local", False):
        from kvbench.errors import KvbenchError

        raise KvbenchError("head-adaptive allocation (allocation=adaptive) keeps full-attention layers only; with "
                           "method.local_layers=compress on a sliding-window model use method.allocation=uniform")
    lengths = torch.tensor([len(p) for p in positions], dtype=torch.long, device=keys.device)
    flat_pos = torch.cat(list(positions)).to(keys.device)
    kv_of_token = torch.repeat_interleave(torch.arange(heads, device=keys.device) // (heads // kv_heads), lengths)
    layer = RaggedLayer(keys[0, kv_of_token, flat_pos], values[0, kv_of_token, flat_pos], positions, lengths,
                        offset=getattr(previous, "offset", 0))
    cache.layers[rank] = layer
    return layer


# ---- attention ---------------------------------------------------------------------------------------------------
def ragged_attention(query, prefix_keys, prefix_values, foreign, cu_seqlens, max_length, tail_keys, tail_values,
                     scaling: float | None = None) -> torch.Tensor:
    """query [1, H, m, d]; prefix [T, d] in S segments (`cu_seqlens`; `foreign` [S, T] marks the tokens of other
    heads, None for the FlashAttention path); tail [1, S, t, d] whose last m tokens are the queries' own (causal
    among them). Returns [1, m, H, d]."""
    _, heads, m, d = query.shape
    stored = tail_keys.shape[1]
    group = heads // stored
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    q = query[0].reshape(stored, group * m, d)  # [S, R, d], rows R = (query head in group, step)
    if foreign is None:
        tail_logits = _tail_logits(q, tail_keys[0], scale, group, m)  # [S, R, t]
        out_p, lse_p = _flash_prefix(q, prefix_keys, prefix_values, cu_seqlens, max_length, scale, group, m)
        peak = tail_logits.amax(-1, keepdim=True)
        weights = (tail_logits - peak).exp()
        total = weights.sum(-1, keepdim=True)
        lse_t = (peak + total.log()).squeeze(-1)
        out_t = torch.bmm(weights / total, tail_values[0].float())
        lse = torch.logaddexp(lse_p, lse_t)
        out = out_p * (lse_p - lse).exp().unsqueeze(-1) + out_t * (lse_t - lse).exp().unsqueeze(-1)
    else:
        q = q.float() * scale
        tail_logits = _tail_logits(q, tail_keys[0], 1.0, group, m)
        out = _torch_attention(q, prefix_keys, prefix_values, foreign, tail_logits, tail_values[0])
    return out.to(query.dtype).view(heads, m, d).transpose(0, 1).unsqueeze(0)


def _tail_logits(q, keys, scale, group, m):
    """Logits [S, R, t] of the queries against the dense tail [S, t, d]; the last m tail tokens are the
    queries' own (causal among them)."""
    t = keys.shape[1]
    logits = torch.bmm(q.float(), keys.float().transpose(1, 2))
    if scale != 1.0:
        logits = logits * scale
    if m > 1:
        step = torch.arange(m, device=q.device).repeat(group)  # row r = (head in group, step)
        future = torch.arange(t, device=q.device)[None, :] > (t - m + step)[:, None]
        logits = logits.masked_fill(future, float("-inf"))
    return logits


def _torch_attention(q, prefix_keys, prefix_values, foreign, tail_logits, tail_values):
    """Pure PyTorch, `q` already scaled: one GEMM of all heads' queries against the flat prefix ([S*R, T]: S*R
    rows, tiny next to the keys), other heads' tokens masked out (nothing padded is stored), one softmax per head
    over its own prefix tokens and its tail, then a GEMM for the prefix values added to a batched one for the
    tail."""
    stored, rows, d = q.shape
    total = prefix_keys.shape[0]
    prefix_logits = torch.mm(q.reshape(stored * rows, d), prefix_keys.float().T).view(stored, rows, total)
    prefix_logits = prefix_logits.masked_fill_(foreign.unsqueeze(1), float("-inf"))
    probs = torch.softmax(torch.cat([tail_logits, prefix_logits], dim=-1), dim=-1)  # every row has its own query
    out = torch.bmm(probs[..., :tail_logits.shape[-1]], tail_values.float()).view(stored * rows, d)
    out = out.addmm_(probs[..., tail_logits.shape[-1]:].reshape(stored * rows, total), prefix_values.float())
    return out.view(stored, rows, d)


def _flash_prefix(q, keys, values, cu_seqlens, max_length, scale, group, m):
    """FlashAttention varlen over the prefix: stored heads are the batch, each head's g query heads the varlen
    heads (one KV head each, MQA). Returns [S, g*m, d] and the log-sum-exp [S, g*m] (float32)."""
    from flash_attn import flash_attn_varlen_func

    stored, d = q.shape[0], q.shape[-1]
    q_var = q.view(stored, group, m, d).transpose(1, 2).reshape(stored * m, group, d)  # token (s, step), heads g
    cu_q = torch.arange(0, (stored + 1) * m, m, device=q.device, dtype=torch.int32)
    out, lse, _ = flash_attn_varlen_func(q_var, keys.unsqueeze(1), values.unsqueeze(1), cu_q, cu_seqlens, m,
                                         max_length, softmax_scale=scale, causal=False, return_attn_probs=True)
    out = out.view(stored, m, group, d).transpose(1, 2).reshape(stored, group * m, d).float()
    lse = lse.view(group, stored, m).permute(1, 0, 2).reshape(stored, group * m).float()  # lse: [heads, total_q]
    return out, lse
