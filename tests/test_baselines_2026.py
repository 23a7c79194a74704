"""The 2025-26 baselines beyond their golden cases: Expected Attention, KVzip and random against their references'
formulas (recomputed here independently on small inputs), the kvpress budget rounding, window 0, CAKE's settings,
and the hooks for methods that need the model."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conftest import random_prompt
from kvbench.cache import CompressedCache
from kvbench.engine import generate, prefill
from kvbench.errors import KvbenchError
from kvbench.golden import synthetic_layer
from kvbench.methods import build_method
from kvbench.methods.expected_attention import unrotate
from kvbench.methods.kvzip import chunk_passes, kept_per_head, pruned_per_layer, reconstruction_scores


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def run_layers(method, num_layers=3, seq_len=300, heads=8, kv_heads=2, head_dim=16, seed=7):
    cache = CompressedCache(num_layers)
    method.begin(seq_len, num_layers)
    for layer in range(num_layers):
        q, k, v = synthetic_layer(seed, layer, heads, kv_heads, seq_len, head_dim)
        cache.update(k, v, layer)
        method.compress_layer(layer, q, k, v, cache)
    return cache


def as_sets(kept):
    return [[sorted(head) for head in layer] for layer in kept]


# ---- window 0 and kvpress budgets ---------------------------------------------------------------------------------
def test_window_zero_only_for_methods_that_have_no_window():
    for name in ("knorm", "expected_attention", "kvzip", "random", "tova"):  # tova 0: the TOVA paper's rule
        assert build_method(name, budget=64, window_size=0).window_size == 0
    for name in ("snapkv", "cake"):
        with pytest.raises(KvbenchError, match="window_size=0 must be at least 1"):
            build_method(name, budget=64, window_size=0)


def test_knorm_without_window_can_evict_the_last_tokens():
    cache = run_layers(build_method("knorm", budget=32), num_layers=1)
    q, k, v = synthetic_layer(7, 0, 8, 2, 300, 16)
    expected = (-k[0].norm(dim=-1)).topk(32, dim=-1).indices
    assert as_sets(cache.kept_positions())[0] == [sorted(h.tolist()) for h in expected]
    assert any(299 not in head for head in cache.kept_positions()[0])


def test_kvpress_budget_rounding():
    """Tokens: exactly `budget`; a fraction: kvbench's round(n * f); compression_ratio: kvpress's int(n * (1 - r))."""
    method = build_method("knorm", budget=0.5)
    assert method.resolve_budget(999) == 500
    method = build_method("knorm", budget=None, compression_ratio=0.5)
    assert method.resolve_budget(999) == 499
    method = build_method("knorm", budget=128)
    assert method.resolve_budget(1100) == 128 and int(1100 * (1 - (1 - 128 / 1100))) == 127
    with pytest.raises(KvbenchError, match="compression_ratio=1.2"):
        build_method("knorm", budget=None, compression_ratio=1.2)


# ---- random -------------------------------------------------------------------------------------------------------
def test_random_is_kvpress_seeded_uniform_topk():
    kept = run_layers(build_method("random", budget=40, seed=3)).kept_positions()
    scores = torch.rand(2, 300, generator=torch.Generator().manual_seed(3))
    expected = [sorted(h.tolist()) for h in scores.topk(40, dim=-1).indices]
    assert all(layer == expected for layer in as_sets(kept))  # every layer draws the same scores, as kvpress
    assert as_sets(run_layers(build_method("random", budget=40, seed=3)).kept_positions()) == as_sets(kept)
    assert as_sets(run_layers(build_method("random", budget=40, seed=4)).kept_positions()) != as_sets(kept)


def test_random_config_uses_the_run_seed():
    from kvbench.config import compose

    assert compose(["method=random", "seed=11"]).method.seed == 11


# ---- Expected Attention -------------------------------------------------------------------------------------------
def rotary(head_dim=16, theta=10000.0, scaling=None):
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=4096, rope_theta=theta)
    if scaling is not None:
        config.rope_parameters = {"rope_type": "yarn", "factor": scaling, "rope_theta": theta,
                                  "original_max_position_embeddings": 256}
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("scaling", [None, 4.0])
def test_unrotate_inverts_the_models_rope(scaling):
    rope = rotary(scaling=scaling)
    if scaling is not None:
        assert rope.attention_scaling != 1.0  # the scaled case really is scaled
    pre = torch.randn(1, 4, 50, 16)
    cos, sin = rope(pre, torch.arange(50)[None])
    post, _ = apply_rotary_pos_emb(pre, pre, cos, sin)
    assert torch.allclose(unrotate(post, cos[0], sin[0]), pre, atol=1e-5)


def expected_attention_reference(pre_q, keys, values, rope, n_sink, future, use_cov=True):
    """The kvpress formula written out: explicit rotation matrices per future position (pairs i, i + d/2)."""
    heads, n, d = pre_q.shape[1], keys.shape[2], keys.shape[3]
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    half = d // 2
    inv_freq = rope.inv_freq.double()
    rotation = torch.zeros(d, d, dtype=torch.float64)
    for p in range(n, n + future):
        r = torch.zeros(d, d, dtype=torch.float64)
        for i in range(half):
            c, s = math.cos(p * inv_freq[i]), math.sin(p * inv_freq[i])
            r[i, i], r[i, i + half], r[i + half, i], r[i + half, i + half] = c, -s, s, c
        rotation += r * rope.attention_scaling / future
    scores = torch.zeros(kv_heads, n - n_sink, dtype=torch.float64)
    for h in range(heads):
        q = pre_q[0, h, n_sink:].double()
        mu = q.mean(0)
        cov = (q - mu).T @ (q - mu) / q.shape[0]
        mu_f, cov_f = rotation @ mu, rotation @ cov @ rotation.T
        k = keys[0, h // group, n_sink:].double()
        logits = k @ mu_f / math.sqrt(d) + (use_cov * ((k @ cov_f) * k).sum(-1) / (2 * d))
        scores[h // group] += torch.softmax(logits, 0) / group
    scores = scores * values[0, :, n_sink:].double().norm(dim=-1)
    return torch.cat([torch.full((kv_heads, n_sink), scores.max().item() + 1, dtype=torch.float64), scores], 1)


@pytest.mark.parametrize("use_cov", [True, False])
def test_expected_attention_follows_the_kvpress_formula(use_cov):
    n, budget = 120, 30
    rope = rotary()
    gen = torch.Generator().manual_seed(0)
    pre_q = torch.randn(1, 8, n, 16, generator=gen) + torch.randn(1, 8, 1, 16, generator=gen)
    keys = torch.randn(1, 2, n, 16, generator=gen)
    values = torch.randn(1, 2, n, 16, generator=gen)
    cos, sin = rope(pre_q, torch.arange(n)[None])
    post_q, _ = apply_rotary_pos_emb(pre_q, pre_q, cos, sin)
    method = build_method("expected_attention", budget=budget, n_future_positions=64, use_covariance=use_cov)
    method.bind(nn.ModuleDict({"rotary_emb": rope}))
    got = method.kv_scores(0, post_q, keys, values)
    want = expected_attention_reference(pre_q, keys, values, rope, 4, 64, use_cov)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-7)
    cache = CompressedCache(1)
    cache.update(keys, values, 0)
    method.begin(n, 1)
    method.compress_layer(0, post_q, keys, values, cache)
    expected = [sorted(h.tolist()) for h in want.topk(budget, dim=-1).indices]
    assert as_sets(cache.kept_positions())[0] == expected
    assert all(set(range(4)) <= set(head) for head in expected)  # the sinks are always kept


def test_expected_attention_needs_a_bound_model_with_one_rotary_module():
    method = build_method("expected_attention", budget=16)
    with pytest.raises(KvbenchError, match="call method.bind"):
        run_layers(method, num_layers=1, seq_len=64)
    with pytest.raises(KvbenchError, match="has 2"):
        method.bind(nn.ModuleDict({"a": rotary(), "b": rotary()}))


# ---- KVzip --------------------------------------------------------------------------------------------------------
def test_kvzip_chunks_follow_kvpress():
    ids = torch.arange(100, 112)[None]
    first, nxt, suffix = torch.tensor([[1, 1]]), torch.tensor([[2]]), torch.tensor([[3]])
    passes = chunk_passes(ids, first, nxt, suffix, chunk_size=5, prev_postfix_size=2)
    assert [(s, e) for s, e, _ in passes] == [(0, 5), (5, 10), (10, 12)]
    assert passes[0][2].tolist() == [[1, 1, 3, 100, 101, 102, 103, 104]]
    assert passes[1][2].tolist() == [[2, 103, 104, 3, 105, 106, 107, 108, 109]]
    assert passes[2][2].tolist() == [[2, 108, 109, 3, 110, 111]]


@pytest.mark.parametrize("block", [7, 23, 512])
@pytest.mark.parametrize("start, end", [(0, 40), (40, 70)])
def test_kvzip_scores_are_the_reference_softmax_max(start, end, block):
    """kvpress `score_kvzip`: softmax over [sink keys, chunk keys, pass keys] with a causal pass block, the max
    over the group and the pass's queries at the chunk's columns."""
    gen = torch.Generator().manual_seed(1)
    n, m = 70, 23
    queries = torch.randn(1, 8, m, 16, generator=gen) * 2
    keys = torch.randn(1, 2, n + m, 16, generator=gen)
    got = reconstruction_scores(queries, keys, start, end, n_sink=4, block=block)
    sink = min(4, start)
    sub = torch.cat([keys[:, :, :sink], keys[:, :, start:end], keys[:, :, -m:]], dim=2)
    sub = sub.repeat_interleave(4, dim=1)
    logits = queries @ sub.transpose(-1, -2) / 4.0
    mask = torch.full((m, m), float("-inf")).triu(1)
    logits[..., -m:] += mask
    attn = torch.softmax(logits, dim=-1)[..., sink:sink + end - start]
    want = attn.view(1, 2, 4, m, -1).amax(dim=(2, 3))[0]
    assert torch.allclose(got, want, atol=1e-6)


def test_kvzip_prunes_the_lowest_scores_over_all_layers_then_across_heads():
    """kvpress `compress_post`: a global bottom-k counts each layer's pruned pairs; a layer then prunes its count
    across its heads together, so heads keep different numbers and the total is exact."""
    scores = torch.rand(3, 2, 50, generator=torch.Generator().manual_seed(2))
    pruned = pruned_per_layer(scores, 3 * 2 * 30)
    threshold = scores.flatten().sort().values[-3 * 2 * 20]
    assert [100 - p for p in pruned] == [int((scores[l] >= threshold).sum()) for l in range(3)]
    assert sum(pruned) == 180
    kept = [kept_per_head(scores[l], pruned[l]) for l in range(3)]
    for l in range(3):
        assert [idx.tolist() for idx in kept[l]] == [sorted((scores[l, h] >= threshold).nonzero()[:, 0].tolist())
                                                     for h in range(2)]
    assert len({len(idx) for layer in kept for idx in layer}) > 1  # heads keep different counts


def test_kvzip_end_to_end_matches_eager_attention_of_the_repeat_pass(tiny_llama):
    """One chunk (chunk_size >= n, start 0: no sink keys) makes KVzip's softmax the model's own attention over
    [prompt, pass]: the eager attention weights of the repeat pass give the expected selection."""
    model, tok = tiny_llama
    n, budget = 160, 40
    ids = random_prompt(n, len(tok), seed=9)
    method = build_method("kvzip", budget=budget)
    method.bind(model, tok)
    out = generate(model, ids, method, max_new_tokens=1)
    assert sum(out.layer_kept) == budget * 4  # exact: no per-head round-down
    kept = as_sets(prefill(model, ids, method).cache.kept_positions())

    first, _, suffix = method.prompt_ids
    repeat = torch.cat([first, suffix, ids], dim=1)
    from transformers import DynamicCache
    impl = model.config._attn_implementation
    try:
        model.set_attn_implementation("eager")
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(ids, past_key_values=cache, use_cache=True)
            attn = model(repeat, past_key_values=cache, use_cache=True, output_attentions=True).attentions
    finally:
        model.set_attn_implementation(impl)
    kv_heads = model.config.num_key_value_heads
    scores = torch.stack([a[0, :, :, :n].reshape(kv_heads, -1, n).amax(dim=1) for a in attn])  # [L, H_kv, n]
    scores[..., :4] = scores.amax() + 1  # kvpress 0.5.5: the sinks are always kept
    pruned = pruned_per_layer(scores, scores.numel() - 4 * kv_heads * budget)
    expected = [[idx.tolist() for idx in kept_per_head(scores[l], p)] for l, p in enumerate(pruned)]
    assert kept == expected
    assert all(h[:4] == [0, 1, 2, 3] for layer in kept for h in layer)


def test_kvzip_needs_the_tokenizer(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(KvbenchError, match="tokenizer"):
        generate(model, random_prompt(200, len(tok)), build_method("kvzip", budget=64), max_new_tokens=1)
    with pytest.raises(KvbenchError, match="tokenizer"):
        build_method("kvzip", budget=64).bind(model)


# ---- CAKE ---------------------------------------------------------------------------------------------------------
def test_cake_taus_from_the_official_table():
    assert build_method("cake", budget=128, tau_model="llama3.1-8b-128k").taus(128) == (1.6, 0.6)
    assert build_method("cake", budget=64, tau_model="llama3.1-8b-128k").taus(64) == (1.0, 1.0)
    assert build_method("cake", budget=128).taus(128) == (1.0, 1.0)
    assert build_method("cake", budget=128, tau1=2.0, tau2=3.0, tau_model="qwen2.5-7b-instruct").taus(128) == (2, 3)
    with pytest.raises(KvbenchError, match="tau_model='llama3'"):
        build_method("cake", budget=128, tau_model="llama3")
    with pytest.raises(KvbenchError, match="go together"):
        build_method("cake", budget=128, tau1=1.0)


def test_cake_keeps_prompts_up_to_budget_plus_window(tiny_llama):
    model, tok = tiny_llama
    out = generate(model, random_prompt(150, len(tok)), build_method("cake", budget=128), max_new_tokens=1)
    assert out.layer_kept == [150] * 4
    out = generate(model, random_prompt(161, len(tok)), build_method("cake", budget=128), max_new_tokens=1)
    assert sum(out.layer_kept) <= 128 * 4 and len(out.method_record["allocations"]) == 4


# ---- every new method on a real (tiny) model ---------------------------------------------------------------------
@pytest.mark.parametrize("name", ["knorm", "tova", "cake", "expected_attention", "kvzip", "random"])
def test_new_methods_generate_within_budget(tiny_llama, name):
    model, tok = tiny_llama
    method = build_method(name, budget=48)
    method.bind(model, tok)
    out = generate(model, random_prompt(400, len(tok), seed=2), method, max_new_tokens=3)
    assert len(out.token_ids) == 3
    assert 48 * 4 - 4 <= sum(out.layer_kept) <= 48 * 4


def test_kvzip_refuses_reconstruction_passes_it_did_not_see(tiny_llama, monkeypatch):
    """If the attention wrapper stopped showing multi-token passes to `observe_layer`, KVzip would rank by its
    initial zeros: an error, not a silently wrong selection."""
    model, tok = tiny_llama
    method = build_method("kvzip", budget=64)
    method.bind(model, tok)
    monkeypatch.setattr(method, "observe_layer", lambda *args: None)
    with pytest.raises(KvbenchError, match="showed 0 of 4 layers"):
        generate(model, random_prompt(200, len(tok)), method, max_new_tokens=1)
