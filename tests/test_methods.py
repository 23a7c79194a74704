"""Method-level behaviour beyond the golden cases: DynamicKV's fixed mode, warnings, validation."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from kvbench.cache import CompressedCache
from kvbench.errors import KvbenchError
from kvbench.golden import synthetic_layer
from kvbench.methods import build_method


def run_layers(method, num_layers: int, seq_len: int = 700, heads: int = 8, kv_heads: int = 2, seed: int = 218):
    cache = CompressedCache(num_layers)
    method.begin(seq_len, num_layers)
    for layer in range(num_layers):
        q, k, v = synthetic_layer(seed, layer, heads, kv_heads, seq_len, 16)
        cache.update(k, v, layer)
        method.compress_layer(layer, q, k, v, cache)
    return cache


@pytest.mark.parametrize("num_layers", [6, 12, 30])
def test_dynamickv_fixed_mode_keeps_the_budget_without_duplicates(num_layers):
    method = build_method("dynamickv", budget=192, window_size=8, mode="fixed")
    cache = run_layers(method, num_layers)
    for heads in cache.kept_positions():
        for head in heads:
            assert max(Counter(head).values()) == 1, "a position is kept twice"
    kept = cache.tokens_per_head()
    assert sum(kept) <= 192 * num_layers and min(kept) >= 8
    assert len(method.allocations) == -(-num_layers // 4)  # every 4 layers and once at the last layer


def test_dynamickv_official_mode_duplicates_where_the_official_code_does():
    # Case dynamickv_s218_L12_n700_b192 of the golden set: the official code keeps extra window copies.
    cache = run_layers(build_method("dynamickv", budget=192, window_size=8), 12)
    duplicated = [max(Counter(head).values()) for heads in cache.kept_positions() for head in heads]
    assert max(duplicated) == 2


def test_dynamickv_official_mode_warns_when_depth_is_not_a_multiple_of_the_interval():
    method = build_method("dynamickv", budget=64, window_size=8)
    with pytest.warns(UserWarning, match="last 2 layer"):
        method.begin(1000, 30)


def test_h2o_causal_and_official_scores_differ_and_both_keep_the_budget():
    official = run_layers(build_method("h2o", budget=64, window_size=8), 2)
    causal = run_layers(build_method("h2o", budget=64, window_size=8, mode="causal"), 2)
    assert official.tokens_per_head() == causal.tokens_per_head() == [64, 64]
    assert official.kept_positions() != causal.kept_positions()


def test_per_kv_head_mode_keeps_one_selection_per_kv_head():
    cache = run_layers(build_method("snapkv", budget=64, window_size=8, cache_heads="per_kv_head"), 2)
    assert [len(heads) for heads in cache.kept_positions()] == [2, 2]
    assert cache.layers[0].keys.shape == (1, 2, 64, 16)


@pytest.mark.parametrize("params, message", [
    ({"name": "snapkv", "budget": 8, "window_size": 8}, "must be larger than method.window_size=8"),
    ({"name": "pyramidkv", "budget": 64, "beta": 0}, "beta=0"),
    ({"name": "dynamickv", "budget": 64, "radio_max": 0.5}, "radio_max=0.5"),
    ({"name": "snapkv", "budget": 64, "typo_setting": 1}, "has no setting"),
    ({"name": "nosuch", "budget": 64}, "unknown method 'nosuch'"),
    ({"name": "snapkv"}, "needs a budget"),
])
def test_invalid_method_settings_are_clear_errors(params, message):
    with pytest.raises(KvbenchError, match=message):
        build_method(**params)


# ---- head-adaptive allocation (AdaKV) and the allocation step ------------------------------------------------
def test_head_adaptive_counts_official_floor_arithmetic_and_exact_mode():
    from kvbench.methods.base import head_adaptive_counts

    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(8, 400, generator=gen) ** torch.linspace(0.2, 6, 8)[:, None]  # broad to focused heads
    official = head_adaptive_counts(scores, 32, 0.2, "official")
    exact = head_adaptive_counts(scores, 32, 0.2, "exact")
    assert len(set(official.tolist())) > 1 and official.min() >= 6  # floor int(32 * 0.2) = 6
    # Each head is rounded on its own (the official arithmetic): within S/2 of S x budget less the truncated
    # floor's shortfall S x frac(32 * 0.2), on either side of S x budget.
    assert abs(int(official.sum()) - (8 * 32 - 8 * 0.4)) <= 8 / 2
    assert int(exact.sum()) == 8 * 32 and exact.min() >= 6
    assert head_adaptive_counts(scores, 401, 0.2).tolist() == [400] * 8  # a budget above the prefix keeps all
    uniform = head_adaptive_counts(scores, 32, 1.0, "exact")  # alpha = 1: every head its floor = uniform
    assert uniform.tolist() == [32] * 8


def test_adaptive_allocation_composes_with_any_scorer():
    cache = run_layers(build_method("h2o", budget=64, window_size=8, allocation="adaptive"), 2)
    lengths = [len(head) for head in cache.kept_positions()[0]]
    assert len(set(lengths)) > 1 and all(n >= 8 + int(56 * 0.2) for n in lengths)
    record = build_method("snapkv", budget=64, allocation="adaptive").params()
    assert record["allocation"] == "adaptive" and record["floor_alpha"] == 0.2
    assert "allocation" not in build_method("snapkv", budget=64).params()  # uniform records stay as before


@pytest.mark.parametrize("params, message", [
    ({"name": "snapkv", "budget": 64, "allocation": "adaptivee"}, "method.allocation='adaptivee'"),
    ({"name": "adakv", "budget": 64, "floor_alpha": 1.5}, "floor_alpha=1.5"),
    ({"name": "adakv", "budget": 64, "adaptive_mode": "nope"}, "adaptive_mode='nope'"),
    ({"name": "adakv", "budget": 64, "allocation": "uniform"}, "use method=snapkv"),
    ({"name": "adakv_gqa", "budget": 64, "cache_heads": "per_query_head"}, "contradicts"),
    ({"name": "dynamickv", "budget": 64, "allocation": "adaptive"}, "does not apply to dynamickv"),
    ({"name": "snapkv", "budget": 64, "window_size": 0}, "must be at least 1 for snapkv"),
])
def test_invalid_allocation_settings_are_clear_errors(params, message):
    with pytest.raises(KvbenchError, match=message):
        build_method(**params)


def test_window_size_zero_is_allowed_for_scorers_without_a_window():
    from kvbench.methods.base import ScoredMethod

    class LastKeys(ScoredMethod):
        name = "last_keys_test"

        def score(self, rank, queries, keys):
            return torch.arange(keys.shape[2], dtype=torch.float32).expand(queries.shape[1], -1)

    cache = run_layers(LastKeys(budget=40, window_size=0), 2, seq_len=300)
    assert cache.tokens_per_head() == [40, 40]
    assert sorted(cache.kept_positions()[0][0]) == list(range(260, 300))


def test_head_adaptive_official_rounding_keeps_more_or_fewer_than_the_budget():
    """Issue 25 (Also): the official per-head rounding keeps up to S/2 tokens more, or fewer, than S x budget in a
    layer (the docs said "slightly fewer"); here floor = 30 * 0.2 = 6 exactly, so only the rounding moves it."""
    from kvbench.methods.base import head_adaptive_counts

    sums = []
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(8, 300, generator=gen) ** torch.linspace(0.2, 6, 8)[:, None]
        sums.append(int(head_adaptive_counts(scores, 30, 0.2, "official").sum()))
    assert all(abs(s - 8 * 30) <= 4 for s in sums)
    assert max(sums) > 8 * 30 and min(sums) < 8 * 30
