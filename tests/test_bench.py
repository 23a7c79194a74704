"""The performance benchmark code on the tiny Llama: the JSON it writes, the KV-bytes formula (with values worked
out by hand), the decode shortcut, the paired ratios, and the single-pass H2O scores it relies on."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import random_prompt
from kvbench.engine import prefill
from kvbench.longbench.metrics import METRICS
from kvbench.methods import build_method
from kvbench.methods.base import truncate_layer
from kvbench.methods.h2o import blocked_scores, single_pass_scores

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench  # noqa: E402

TINY_SETTINGS = dict(model="tiny_llama", prefill_lengths=[160], decode_lengths=[160], decode_budgets=[64],
                     repeats=1, decode_steps=2, kv_check_length=160, kv_check_budgets=[64], scorer_seconds=0.01,
                     adaptive_budget=64)


@pytest.fixture(scope="module")
def quick_record(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 4-layer model of width 64 gains nothing from threads, and loses under load
    try:
        record = bench.run_cpu(bench.Settings(**TINY_SETTINGS))
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("bench")
    path = bench.save_results(record, out, "cpu")
    return record, path, out


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_bench_json_has_every_section(quick_record):
    record, path, out = quick_record
    saved = json.loads((out / "latest_cpu.json").read_text())
    assert json.loads(path.read_text()) == saved and path.name.startswith("cpu_")
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporary files
    for key in ("machine", "git", "settings", "prefill", "decode", "kv_bytes", "scorers", "targets", "notes"):
        assert key in saved
    assert saved["machine"]["torch"] == torch.__version__ and "transformers" in saved["machine"]
    assert saved["model"] | {"layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 16} == saved["model"]
    row = saved["prefill"]["sdpa"]["160"]
    assert list(row) == list(bench.METHOD_ORDER)
    assert row["fullkv"]["ratio_to_fullkv"] == 1.0 and len(row["h2o"]["raw_s"]) == 1
    assert row["h2o"]["median_s"] > 0 and row["h2o"]["peak_bytes"] > 0
    assert row["snapkv"]["kv"]["measured_bytes"] == 2 * 128 * 4 * 4 * 16 * 4  # budget 128 x 4 layers x 4 heads
    decode = saved["decode"]["sdpa"]["160"]
    assert set(decode) == {"fullkv", "budget_64", "snapkv_64", "adakv_64"} and len(decode["fullkv"]["raw_ms"]) == 3
    assert set(saved["scorers"]) == set(METRICS)
    assert all(v["predictions_per_s"] > 0 for v in saved["scorers"].values())
    kv_target = [t for t in saved["targets"] if t["target"].startswith("KV bytes")]
    n_rows = 1 + 2 * (len(bench.METHOD_ORDER) - 1)  # fullkv + every other method x 2 GQA modes
    assert kv_target[0]["passed"] and kv_target[0]["measured"] == f"{n_rows}/{n_rows}"
    assert {"adakv", "adakv_pyramid"} <= set(bench.METHOD_ORDER)
    # The 2025-26 baselines too, bound to the model and tokenizer as the pipeline binds them; their KV bytes match.
    assert {"knorm", "tova", "cake", "expected_attention", "kvzip", "random"} <= set(row)
    assert all(r["matches"] for r in saved["kv_bytes"] if r["method"] in ("cake", "kvzip", "expected_attention"))
    ada = row["adakv"]
    assert ada["base"] == "snapkv" and ada["ratio_to_base"] > 0
    assert ada["kv"]["measured_bytes"] == ada["kv"]["kept_tokens_bytes"] < ada["kv"]["padded_bytes"]
    assert decode["adakv_64"]["ratio_to_snapkv"] > 0
    labels = [t["target"] for t in saved["targets"]]
    assert "adakv prefill <= 1.05x snapkv" in labels and "adakv_64 decode <= 1.2x snapkv ms/token" in labels
    assert "adakv KV bytes equal the kept tokens' bytes (not the padded size)" in labels
    assert "Targets:" in bench.summary_table(record)


@pytest.mark.parametrize("name, params, expected", [
    ("fullkv", {}, 2 * 256 * 4 * 2 * 16 * 4),  # every token, 2 KV heads
    ("snapkv", {"budget": 64, "window_size": 8}, 2 * 64 * 4 * 4 * 16 * 4),  # one row per query head
    ("snapkv", {"budget": 64, "window_size": 8, "cache_heads": "per_kv_head"}, 2 * 64 * 4 * 2 * 16 * 4),
    ("snapkv", {"budget": 300, "window_size": 8}, 2 * 256 * 4 * 2 * 16 * 4),  # prompt within budget: kept whole
    # PyramidKV, base 56: max 110, min 2, step 36 -> prefixes 110, 74, 38, 2, plus the window of 8 each
    ("pyramidkv", {"budget": 64, "window_size": 8}, 2 * (118 + 82 + 46 + 10) * 4 * 16 * 4),
    # DynamicKV, 4 layers, one update at the last layer: the whole-model prefix budget 4 x 56 plus 4 windows
    ("dynamickv", {"budget": 64, "window_size": 8}, 2 * (4 * 56 + 4 * 8) * 4 * 16 * 4),
])
def test_kv_formula_matches_measured_bytes(tiny_llama, name, params, expected):
    model, tok = tiny_llama
    method = build_method(name, **params)
    assert bench.expected_kv_bytes(method, 256, bench.model_shape(model)) == expected
    state = prefill(model, random_prompt(256, len(tok), seed=7), method)
    assert bench.kv_record(model, method, state.cache, 256)["matches"]


def test_kv_check_flags_a_cache_of_the_wrong_size(tiny_llama):
    model, tok = tiny_llama
    method = build_method("snapkv", budget=64, window_size=8)
    state = prefill(model, random_prompt(256, len(tok), seed=8), method)
    truncate_layer(state.cache, 2, 55, 8)  # one layer now holds 63 tokens instead of 64
    record = bench.kv_record(model, method, state.cache, 256)
    assert not record["matches"] and record["expected_bytes"] - record["measured_bytes"] == 2 * 4 * 16 * 4


def test_compressed_copy_equals_a_streamingllm_prefill(tiny_llama):
    model, tok = tiny_llama
    ids = random_prompt(200, len(tok), seed=9)
    full = prefill(model, ids, None)
    copied = bench.compressed_copy(full.cache, 64, num_heads=4, head_dim=16, window=32)
    direct = prefill(model, ids, build_method("streamingllm", budget=64, window_size=32)).cache
    for ours, theirs in zip(copied.layers, direct.layers):
        assert torch.equal(ours.positions, theirs.positions) and torch.equal(ours.keys, theirs.keys)


def test_ratios_are_medians_of_paired_ratios():
    raw = {name: {"prefill_s": [1.0, 2.0, 4.0], "peak_bytes": [100] * 3, "peak_delta_bytes": [0] * 3}
           for name in bench.METHOD_ORDER}
    raw["h2o"] = {"prefill_s": [1.1, 2.4, 4.0], "peak_bytes": [110, 130, 100], "peak_delta_bytes": [1, 2, 3]}
    kv = {name: {} for name in bench.METHOD_ORDER}
    out = bench.summarize_prefill(raw, kv)["h2o"]
    assert out["ratio_to_fullkv"] == pytest.approx(1.1)  # per-repeat ratios 1.1, 1.2, 1.0
    assert out["ratio_of_medians"] == pytest.approx(1.2) and out["peak_ratio_to_fullkv"] == pytest.approx(1.1)
    assert bench.rotated([1, 2, 3], 4) == [2, 3, 1]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads,n,window,rows_per_gemm", [(6, 2, 300, 16, 64), (3, 3, 97, 1, 10),
                                                                   (8, 1, 130, 40, 24)])
def test_single_pass_h2o_scores_equal_blocked_scores(causal, heads, kv_heads, n, window, rows_per_gemm):
    # Blocks that straddle the window, a window of 1, no GQA and one KV head for 8 query heads.
    gen = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(1, heads, n, 32, generator=gen) * 2, torch.randn(1, kv_heads, n, 32, generator=gen)
    fast = single_pass_scores(queries, keys, window, causal, rows_per_gemm)
    blocked = blocked_scores(queries, keys, window, causal, query_block=64)
    assert fast.shape == (heads, n - window)
    torch.testing.assert_close(fast, blocked, rtol=1e-5, atol=1e-6)


def test_gpu_mode_without_a_gpu_skips_with_a_message(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    assert bench.main(["--gpu"]) == 0
    assert "no CUDA GPU" in capsys.readouterr().out


def test_methods_subset_always_keeps_fullkv_and_rejects_unknown_names(capsys):
    settings = bench.Settings(methods=["kvzip", "snapkv"])
    assert bench.bench_methods(settings) == ["fullkv", "snapkv", "kvzip"]  # report order
    assert bench.bench_methods(settings, bench.GPU_NOT_BENCHED) == ["fullkv", "snapkv"]
    assert bench.main(["--methods", "snapkv", "nope"]) == 2
    assert "--methods nope: not a benchmarked method" in capsys.readouterr().err


def test_bad_repeats_is_a_clear_error(capsys):
    assert bench.main(["--repeats", "0"]) == 2
    assert "--repeats 0" in capsys.readouterr().err


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_gpu_benchmark_code_on_a_small_llama_shape_on_cpu():
    settings = bench.Settings(device="cpu", model="llama_shaped_small", prefill_lengths=[160], decode_lengths=[160],
                              decode_budgets=[64], repeats=1, decode_steps=2)
    record = bench.run_gpu(settings, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, vocab_size=1000)
    row = record["prefill"]["sdpa"]["160"]
    assert row["fullkv"]["tokens_per_s"] > 0 and record["model"]["dtype"] == "torch.bfloat16"
    assert row["snapkv"]["kv"] | {"measured_bytes": 2 * 128 * 2 * 4 * 16 * 2, "matches": True} == row["snapkv"]["kv"]
    assert [t["target"] for t in record["targets"]][0] == "streamingllm prefill <= 1.03x FullKV"
