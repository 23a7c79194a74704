"""Expected Attention (kvpress `expected_attention_press.py` @8bb29b9): the attention future queries are expected
to pay, from the statistics of the prompt's queries.

1. Pre-RoPE queries of positions `n_sink..n-1`: their mean `mu` and covariance `cov` per query head.
2. The RoPE rotation averaged over the next `n_future_positions` positions, `R = mean_p (cos_p I + sin_p P)`, applied:
   `mu R^T`, `R cov R^T`.
3. `s = softmax_n(mu.k / sqrt(d) + k^T cov k / (2 d))` per query head (k the post-RoPE keys after the sinks), mean
   over the query group, times `||v||` (plus `epsilon` first); the first `n_sink` tokens are always kept.

Pre-RoPE queries without copied modeling code: the attention wrapper sees post-RoPE queries; RoPE is a rotation per
position (scaled by the rotary module's `attention_scaling`), so `q = (q' cos - rotate_half(q') sin) / (cos^2 +
sin^2)` recovers the queries the model fed to RoPE (after any q-norm: what kvpress's `get_prerope_query_states`
returns). `cos`/`sin` come from the model's own rotary embedding module, found once by `bind(model)`; a model with
several rotary modules (per-layer RoPE, e.g. Gemma 3's local/global) or partial rotary dims is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvbench.errors import KvbenchError
from kvbench.methods.kvpress import KvpressScored


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def unrotate(queries: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert `q' = q cos + rotate_half(q) sin` (cos/sin [n, d], possibly scaled) for queries [1, H, n, d]."""
    return (queries * cos - rotate_half(queries) * sin) / (cos * cos + sin * sin)


def average_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """mean over positions of `cos_p I + sin_p P` ([F, d] each -> [d, d]), P the matrix of rotate_half."""
    d = cos.shape[-1]
    half = d // 2
    perm = torch.zeros(d, d, dtype=cos.dtype, device=cos.device)
    perm[half:, :half] = torch.eye(half, dtype=cos.dtype, device=cos.device)
    perm[:half, half:] = -torch.eye(half, dtype=cos.dtype, device=cos.device)
    eye = torch.eye(d, dtype=cos.dtype, device=cos.device)
    return (cos.unsqueeze(1) * eye + sin.unsqueeze(1) * perm).mean(dim=0)  # column j scaled, as kvpress


def expected_attention_scores(pre_queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                              rotation: torch.Tensor, n_sink: int, use_covariance: bool, use_vnorm: bool,
                              epsilon: float) -> torch.Tensor:
    """kvpress's formula: pre-RoPE queries [1,H,n,d], post-RoPE keys/values [1,H_kv,n,d], the averaged future
    rotation [d,d] -> [H_kv, n] scores (sinks padded with max + 1)."""
    heads, n, d = pre_queries.shape[1], keys.shape[2], keys.shape[3]
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    q = pre_queries[0, :, n_sink:]  # [H, n - s, d]
    mu = q.mean(dim=1, keepdim=True)
    mu_future = mu[:, 0] @ rotation.T  # [H, d]
    k = keys[0, :, n_sink:].repeat_interleave(group, dim=0)  # [H, n - s, d]
    logits = torch.einsum("hd,hnd->hn", mu_future, k) / math.sqrt(d)
    if use_covariance:
        centered = q - mu
        cov = torch.einsum("hsi,hsj->hij", centered, centered) / q.shape[1]
        cov_future = rotation @ cov @ rotation.T
        logits = logits + torch.einsum("hni,hij,hnj->hn", k, cov_future, k) / d / 2
    scores = F.softmax(logits, dim=-1).view(kv_heads, group, n - n_sink).mean(dim=1)
    if use_vnorm:
        scores = (scores + epsilon) * values[0, :, n_sink:].norm(dim=-1)
    return F.pad(scores, (n_sink, 0), value=scores.max().item() + 1)


@dataclass
class ExpectedAttention(KvpressScored):
    name = "expected_attention"
    display_name = "Expected Attention"
    order = 76
    needs_model: ClassVar[bool] = True  # the model's rotary embedding
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    decode_refusal = ("its query statistics assume the queries sit at positions 0..n-1 of the prompt it scores, "
                      "which no longer holds once decoding tokens are mixed with a compressed prompt")

    def validate(self) -> None:
        super().validate()
        if self.n_future_positions < 1 or self.n_sink < 0:
            raise KvbenchError(f"method.n_future_positions={self.n_future_positions} must be >= 1 and "
                               f"method.n_sink={self.n_sink} >= 0 (kvpress: 512 and 4)")

    def bind(self, model, tokenizer=None) -> None:
        rotary = [m for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
        if len(rotary) != 1:
            raise KvbenchError(f"expected_attention needs the model's one rotary embedding module; "
                               f"{type(model).__name__} has {len(rotary)} (per-layer RoPE is not supported)")
        self.rotary = rotary[0]

    def cos_sin(self, like: torch.Tensor, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = getattr(self, "rotary", None)
        if rotary is None:
            raise KvbenchError("expected_attention needs the model's rotary embedding: call method.bind(model) "
                               "before prefill (kvbench's pipeline does)")
        positions = torch.arange(start, start + count, device=like.device)[None]
        cos, sin = rotary(like, positions)
        if cos.shape[-1] != like.shape[-1]:
            raise KvbenchError(f"expected_attention: the rotary dims ({cos.shape[-1]}) differ from the head dim "
                               f"({like.shape[-1]}); partial RoPE is not supported")
        return cos[0], sin[0]

    def kv_scores(self, rank, queries, keys, values):
        if values is None:
            raise KvbenchError("expected_attention weighs its scores by the value norms: pass the values")
        n = keys.shape[2]
        if n <= self.n_sink:
            raise KvbenchError(f"expected_attention: the prompt ({n} tokens) must be longer than n_sink={self.n_sink}")
        cos, sin = self.cos_sin(queries, 0, n)
        pre = unrotate(queries, cos, sin)
        cos_f, sin_f = self.cos_sin(queries, n, self.n_future_positions)
        rotation = average_rotation(cos_f, sin_f)
        return expected_attention_scores(pre, keys, values, rotation, self.n_sink, self.use_covariance,
                                         self.use_vnorm, self.epsilon)
