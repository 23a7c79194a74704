"""CAKE's decoding-time eviction (`method=cake method.decode_interval=1`) against the official code, antgroup/cakekv
@c4675ce run unmodified on the shared synthetic inputs (scripts/golden/cakekv_c4675ce_decoding.py;
tests/golden/decoding/FORMAT.md, "CAKE"): after the prefill and after every decoding step, every layer and KV head
holds exactly the official positions, in the official row order (which the next step's pooling reads)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbench.cache import CompressedCache
from kvbench.decoding import DecodeSchedule, positions_held
from kvbench.errors import KvbenchError
from kvbench.golden import sha256_of, synthetic_layer
from kvbench.methods import registry

CASES = sorted((Path(__file__).parent / "golden" / "decoding" / "cake").glob("*.json"))


def kvbench_steps(case: dict, interval: int = 1, cache_heads: str = "per_kv_head"):
    """Prefill then one synthetic token per forward through kvbench's schedule; the positions every layer holds
    (per stored head, row order) after the prefill and after each step, and the method."""
    p = case["params"]
    method = registry.build("cake", budget=case["budget"], window_size=p["window_size"], cascading=p["cascading"],
                            tau1=p["tau1"], tau2=p["tau2"], gamma=p["gamma"], decode_interval=interval,
                            cache_heads=cache_heads)
    layers, n, steps = case["num_layers"], case["seq_len"], case["decode_steps"]
    inputs = [synthetic_layer(case["seed"], l, case["num_heads"], case["num_kv_heads"], n + steps, case["head_dim"])
              for l in range(layers)]
    for l, (q, k, v) in enumerate(inputs):
        assert [sha256_of(t) for t in (q, k, v)] == [case["sha256"][l][x] for x in ("query", "key", "value")]
    cache = CompressedCache(layers)
    method.begin(n, layers)
    for l, (q, k, v) in enumerate(inputs):
        cache.update(k[:, :, :n], v[:, :, :n], l)
        method.compress_layer(l, q[:, :, :n], k[:, :, :n], v[:, :, :n], cache)
    held = [[positions_held(layer, n - 1) for layer in cache.layers]]
    schedule = DecodeSchedule(method, interval)
    for t in range(n, n + steps):
        schedule.begin_forward(t, 1)
        for l, (q, k, v) in enumerate(inputs):
            cache.update(k[:, :, t:t + 1], v[:, :, t:t + 1], l)
            schedule.after_attention(cache, l, q[:, :, t:t + 1], {})
        schedule.end_forward(cache)
        held.append([positions_held(layer, t) for layer in cache.layers])
    return held, method


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_cake_decoding_keeps_the_official_rows_at_every_step(path):
    case = json.loads(path.read_text())
    held, method = kvbench_steps(case)
    assert [method.prefix_budget(l) for l in range(case["num_layers"])] == case["hh_size"]
    want = [case["prefill_kept_positions"]] + [s["kept_positions"] for s in case["steps"]]
    assert len(held) == len(want) == case["decode_steps"] + 1
    for step, (ours, theirs) in enumerate(zip(held, want)):
        assert ours == theirs, f"step {step}: kept rows differ from cakekv's"
    sizes = [[len(layer[0]) for layer in state] for state in want]
    assert any(now < before + 1 for a, b in zip(sizes, sizes[1:]) for before, now in zip(a, b))  # evictions ran

def test_per_query_head_layout_keeps_the_same_rows_without_gqa():
    """`cache_heads=per_query_head` scores every query head on its own; with one query head per KV head that is the
    official rule, so the MHA case must come out the same."""
    case = json.loads((CASES[0].parent / "cake_s0_L8_H8x8_n512_b128_w32_casc.json").read_text())
    held, _ = kvbench_steps(case, cache_heads="per_query_head")
    assert held == [case["prefill_kept_positions"]] + [s["kept_positions"] for s in case["steps"]]


def test_the_cases_cover_the_official_quirks():
    cases = {p.stem: json.loads(p.read_text()) for p in CASES}
    assert len(cases) >= 8
    # A cascade layer cut below its final share grows back to it while decoding.
    grows = [(name, l) for name, c in cases.items() for l, layer in enumerate(c["prefill_kept_positions"])
             if len(c["steps"][-1]["kept_positions"][l][0]) > len(layer[0])]
    assert any(name.endswith("_casc") and "n512" in name for name, _ in grows)
    # A prompt within budget + window is kept at prefill and cut to the budget at the first decoding step.
    short = cases["cake_s0_L8_H8x2_n150_b128_w32_casc"]
    assert all(len(h) == 150 for layer in short["prefill_kept_positions"] for h in layer)
    assert all(len(h) == 128 for layer in short["steps"][0]["kept_positions"] for h in layer)


def test_cake_decoding_refuses_kvpress_style():
    with pytest.raises(KvbenchError, match="decode_style=kvbench"):
        registry.build("cake", budget=64, decode_interval=1, decode_style="kvpress")
