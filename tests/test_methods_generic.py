"""Generic checks every registered method passes, read from the registry (`kvbench.methods.registry`): a new
method file picks them up with no edit here. `tests/test_registry_dummy.py` runs them on a test-only scorer.

The tests take the method's name from the `method_name` fixture, so another test module can import them and
provide its own `method_name`."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import REPO, random_prompt
from kvbench.cache import CompressedCache
from kvbench.engine import generate
from kvbench.golden import synthetic_layer
from kvbench.methods import registry

PROMPT = 300
# Known gaps, listed rather than hidden (issue 14 merge): these need the model (bind) or finish their selection after
# the prefill, which the synthetic driver does not do yet, and have no size formula of their own.
SYNTHETIC_GAPS = {"expected_attention": "needs method.bind(model) (rotary embedding)",
                  "criticalkv": "needs method.bind(model) (output projections); its golden cases bind a stand-in",
                  "defensivekv": "needs method.bind(model) (output projections); its golden cases bind a stand-in",
                  "layer_defensivekv": "needs method.bind(model) (output projections); its golden cases bind a "
                                       "stand-in",
                  "kvzip": "scores come from reconstruction passes through the model (after_prefill); the model tests "
                           "below check it",
                  "kvzip_plus": "as kvzip (KVzip+ is a configuration of it)"}
FORMULA_GAPS = {}
SYNTH = dict(seq_len=400, heads=8, kv_heads=2, head_dim=16, layers=4)


@pytest.fixture(params=registry.names(builtin_only=True))
def method_name(request):
    return request.param


def paper(name: str, budget=64, **overrides):
    params = {k: v for k, v in registry.get(name).paper_defaults.items() if k != "window_size"}
    if name == "fullkv":
        return registry.build(name)
    window = min(8, max(registry.get(name).cls.min_window, 8))
    return registry.build(name, budget=budget, **{"window_size": window, **params, **overrides})


def run_synthetic(method, seed=3):
    s = SYNTH
    cache = CompressedCache(s["layers"])
    method.begin(s["seq_len"], s["layers"])
    for layer in range(s["layers"]):
        q, k, v = synthetic_layer(seed, layer, s["heads"], s["kv_heads"], s["seq_len"], s["head_dim"])
        cache.update(k, v, layer)
        method.compress_layer(layer, q, k, v, cache)
    return cache


def test_registry_entry_is_complete(method_name):
    spec = registry.get(method_name)
    assert spec.display_name and registry.display_name(method_name) == spec.display_name
    assert method_name in registry.names()
    method = paper(method_name)
    assert method.name == method_name and method.params()["name"] == method_name
    assert isinstance(method.record(), dict)


def test_config_file_builds_the_method(method_name):
    from kvbench.config import compose
    from kvbench.methods import method_from_config

    if not registry.get(method_name).builtin:
        pytest.skip("test-only registration: no configs/method file")
    assert (REPO / "configs" / "method" / f"{method_name}.yaml").exists()
    cfg = compose([f"method={method_name}", "budget=64"])
    method = method_from_config(cfg.method, cfg.budget)
    assert method.name == method_name


@pytest.mark.parametrize("cache_heads", ["per_query_head", "per_kv_head"])
def test_selection_keeps_distinct_positions_window_and_the_expected_size(method_name, cache_heads):
    if method_name in SYNTHETIC_GAPS:
        pytest.skip(f"known gap: {SYNTHETIC_GAPS[method_name]}")
    if method_name == "fullkv":
        method = paper(method_name)
    else:
        preset = registry.get(method_name).preset.get("cache_heads")
        if preset and preset != cache_heads:
            pytest.skip(f"{method_name} fixes cache_heads={preset}")
        method = paper(method_name, cache_heads=cache_heads)
    cache = run_synthetic(method)
    s = SYNTH
    n, window = s["seq_len"], getattr(method, "window_size", 0)
    total = 0
    for layer in cache.kept_positions():
        for head in layer:
            total += len(head)
            counts = Counter(head)
            if method_name != "dynamickv":  # DynamicKV's official mode duplicates window rows (documented)
                assert max(counts.values()) == 1
            assert all(0 <= p < n for p in head)
            assert set(range(n - window, n)) <= set(head)
    shape = {"layers": s["layers"], "heads": s["heads"], "kv_heads": s["kv_heads"]}
    assert total == method.expected_kv_tokens(n, shape)
    assert cache.nbytes() == 2 * total * s["head_dim"] * 4  # bytes are exactly the tokens kept
    if method_name != "fullkv":
        assert total < n * s["layers"] * s["kv_heads"] * (s["heads"] // s["kv_heads"])


def test_budget_not_below_prompt_reproduces_generate(tiny_llama, method_name):
    model, tok = tiny_llama
    ids = random_prompt(PROMPT, len(tok), seed=1)
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, pad_token_id=0)[0, PROMPT:].tolist()
    method = paper(method_name, budget=PROMPT)
    method.bind(model, tok)
    out = generate(model, ids, method, max_new_tokens=6)
    assert out.token_ids == want
    assert out.layer_kept == [PROMPT] * model.config.num_hidden_layers


def test_kv_bytes_on_a_model_equal_the_registry_formula(tiny_llama, method_name):
    model, tok = tiny_llama
    cfg = model.config
    if method_name in FORMULA_GAPS:
        pytest.skip(f"known gap: {FORMULA_GAPS[method_name]}")
    method = paper(method_name, budget=48)
    method.bind(model, tok)
    out = generate(model, random_prompt(PROMPT, len(tok), seed=4), method, max_new_tokens=2)
    shape = {"layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert out.kv_bytes == 2 * method.expected_kv_tokens(PROMPT, shape) * head_dim * 4
    assert len(out.token_ids) == 2


def test_a_budget_held_at_the_methods_minimum_is_reported_with_what_was_asked():
    """resolve_budget never goes below the method's minimum; budget_fields says when it held more than asked."""
    from kvbench.methods import build_method

    snap = build_method("snapkv", budget=0.03125, window_size=32)
    assert snap.budget_fields(1000) == {"budget_tokens": 33, "budget_asked": 31, "budget_clamped": True}
    assert snap.budget_fields(4000) == {"budget_tokens": 125}  # 125 asked, 125 held
    assert build_method("snapkv", budget=48, window_size=32).budget_fields(1000) == {"budget_tokens": 48}
    tova = build_method("tova", compression_ratio=0.9995)  # keeps int(1000 * 0.0005) = 0, held at its window, 1
    assert tova.budget_fields(1000) == {"budget_tokens": 1, "budget_asked": 0, "budget_clamped": True}
    assert build_method("tova", compression_ratio=0.5).budget_fields(1000) == {"budget_tokens": 500}
