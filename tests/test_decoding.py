"""Decoding-time compression (`method.decode_interval`, kvbench.decoding): invariants for every registered method,
read from the registry like tests/test_methods_generic.py, on the tiny Llama; validation; records and run names.
Agreement with kvpress's DecodingPress at every cut: tests/test_decoding_golden.py."""
from __future__ import annotations

import pytest
import torch

from conftest import random_prompt
from kvbench.config import compose, run_name
from kvbench.decoding import head_peak, positions_held, schedule_for
from kvbench.engine import decode_step, generate, prefill
from kvbench.errors import KvbenchError
from kvbench.methods import registry
from kvbench.ragged import RaggedLayer
from test_methods_generic import paper

PROMPT, NEW, INTERVAL = 120, 24, 5
NAMES = registry.names(builtin_only=True)
SCHEDULED = [name for name in NAMES if registry.get(name).cls.decode_refusal is None]  # the others are refused


def decoding_method(name: str, budget: int, interval: int = INTERVAL):
    """The method with its paper defaults, plus the settings its decoding-time rule needs (H2O: mode=causal)."""
    needs = getattr(registry.get(name).cls, "decode_settings", {})
    return paper(name, budget=budget, decode_interval=interval, **needs)


@pytest.mark.parametrize("name", NAMES)
def test_a_method_is_either_scheduled_or_refused_with_its_reason(name):
    assert len(SCHEDULED) >= 10
    reason = registry.get(name).cls.decode_refusal
    if reason is None:
        assert decoding_method(name, budget=64, interval=8).decode_interval == 8
        return
    with pytest.raises(KvbenchError, match="cannot compress during decoding") as err:
        paper(name, budget=64, decode_interval=8) if name != "fullkv" else registry.build(name, decode_interval=8)
    assert reason in str(err.value)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_decode_interval_is_a_one_line_error(bad):
    with pytest.raises(KvbenchError, match="decode_interval") as err:
        registry.build("snapkv", budget=64, decode_interval=bad)
    assert "\n" not in str(err.value)


def test_h2o_decodes_with_the_papers_accumulated_attention_only():
    with pytest.raises(KvbenchError, match="set method.mode=causal"):
        registry.build("h2o", budget=64, decode_interval=8)
    assert registry.build("h2o", budget=64, decode_interval=8, mode="causal").decode_interval == 8


def test_decode_interval_checks_before_the_model_loads():
    from kvbench.config import validate

    with pytest.raises(KvbenchError, match=r"method.decode_interval=1.5: expected an integer or null"):
        validate(compose(["method=snapkv", "budget=64", "method.decode_interval=1.5"]))
    from kvbench.pipeline import prepare

    with pytest.raises(KvbenchError, match="above benchmark.max_new_tokens=30"):
        prepare(compose(["method=snapkv", "budget=64", "method.decode_interval=31", "benchmark=needle"]))
    with pytest.raises(KvbenchError, match="decode_style applies to decoding-time compression only"):
        registry.build("snapkv", budget=64, decode_style="kvpress")


def test_interval_above_a_samples_max_new_tokens_is_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(KvbenchError, match="above max_new_tokens=4"):
        generate(model, random_prompt(PROMPT, len(tok), 1), paper("snapkv", budget=64, decode_interval=5),
                 max_new_tokens=4)


@pytest.mark.parametrize("query", ["aware", "agnostic"])
@pytest.mark.parametrize("name", SCHEDULED)
def test_budget_above_the_final_length_gives_fullkv_tokens(tiny_llama, name, query):
    model, tok = tiny_llama
    method = decoding_method(name, budget=PROMPT + NEW + 40)
    method.bind(model, tok)
    ids = random_prompt(PROMPT, len(tok), seed=2)
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW)
    if query == "agnostic":
        ctx, q = ids[:, :100], ids[:, 100:]
        want = generate(model, ctx, None, question_ids=q, **kwargs)
        out = generate(model, ctx, method, question_ids=q, **kwargs)
    else:
        want = generate(model, ids, None, **kwargs)
        out = generate(model, ids, method, **kwargs)
    assert out.token_ids == want.token_ids and len(out.token_ids) == NEW
    assert out.decode_cuts == NEW // INTERVAL  # the schedule ran; no cut had anything to remove
    assert out.peak_kv_tokens == want.peak_kv_tokens == PROMPT + NEW - 1


def layer_size(layer) -> float:
    """Tokens per head: the most any head holds (dense), the mean over heads (head-adaptive, ragged)."""
    return layer.tokens_per_head() if isinstance(layer, RaggedLayer) else head_peak(layer)


@pytest.mark.parametrize("query", ["aware", "agnostic"])
@pytest.mark.parametrize("name", SCHEDULED)
def test_no_head_holds_more_than_budget_plus_interval(tiny_llama, name, query):
    """Prefill compressed to the budget; after every forward each layer holds at most its post-prefill size plus
    `interval` tokens per head, and each cut brings it back to at most that size. Agnostic: the question chunk is
    one step of the schedule and adds its q tokens once, before the first cut."""
    model, tok = tiny_llama
    budget = 48
    method = decoding_method(name, budget=budget)
    method.bind(model, tok)
    ids = random_prompt(PROMPT, len(tok), seed=3)
    forced = random_prompt(NEW, len(tok), seed=4)[0].tolist()
    schedule = schedule_for(method, model)
    if query == "agnostic":
        from kvbench.engine import question_forward

        ctx, q = ids[:, :100], ids[:, 100:]
        cache = prefill(model, ctx, method).cache
        sizes = [layer_size(layer) for layer in cache.layers]
        question_forward(model, q, 100, cache, schedule)
        extra, position = q.shape[1], PROMPT
    else:
        cache = prefill(model, ids, method).cache
        sizes = [layer_size(layer) for layer in cache.layers]
        extra, position = 1, PROMPT
    assert max(sizes) < PROMPT  # the prefill was compressed
    steps = 1 if query == "agnostic" else 0
    for step, token in enumerate(forced):
        decode_step(model, torch.tensor([[token]]), position + step, cache, schedule)
        steps += 1
        for i, layer in enumerate(cache.layers):
            assert layer_size(layer) <= sizes[i] + INTERVAL + extra - 1 + 1e-9
            if steps % INTERVAL == 0:  # a cut: back to the layer's budget for the sequence so far
                budget_now = method.prefix_budget(i, position + step + 1) + method.window_size
                assert layer_size(layer) <= budget_now + 1e-9, f"step {steps}: a cut left layer {i} above its budget"
                sizes[i], extra = max(layer_size(layer), budget_now), 1
    assert schedule.cuts == steps // INTERVAL >= 4
    # Decoding positions stay the true ones: every kept position is a real token, none repeats, the newest is kept
    # where the method keeps a window.
    last = position + len(forced) - 1
    for layer in cache.layers:
        for head in positions_held(layer, last):
            assert len(set(head)) == len(head) and all(0 <= p <= last for p in head)
            if getattr(method, "window_size", 0) >= 1:
                assert last in head


def test_prediction_line_records_peak_and_schedule(tiny_llama):
    model, tok = tiny_llama
    ids = random_prompt(PROMPT, len(tok), seed=5)
    prefill_only = generate(model, ids, paper("snapkv", budget=48), max_new_tokens=12, min_new_tokens=12)
    scheduled = generate(model, ids, paper("snapkv", budget=48, decode_interval=4), max_new_tokens=12,
                         min_new_tokens=12)
    a, b = prefill_only.log_fields(), scheduled.log_fields()
    assert a["peak_kv_tokens"] == 48 + 11 and "decode_cuts" not in a
    assert b["peak_kv_tokens"] == 48 + 4 and b["decode_cuts"] == 2  # 11 forwards after the prefill: cuts at 4, 8
    assert b["peak_kv_bytes"] < a["peak_kv_bytes"] and b["new_tokens"] == 12
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_attention_heads  # per_query_head layout
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert a["peak_kv_bytes"] == 2 * layers * kv_heads * (48 + 11) * head_dim * 4


def test_schedule_is_in_the_fingerprint_and_the_run_name():
    plain = registry.build("snapkv", budget=64)
    scheduled = registry.build("snapkv", budget=64, decode_interval=16)
    assert "decode_interval" not in plain.params() and "decode_style" not in plain.params()  # old fingerprints
    assert scheduled.params()["decode_interval"] == 16 and scheduled.params()["decode_style"] == "kvbench"
    assert run_name(compose(["method=snapkv", "budget=64"])) == "snapkv_64"
    assert run_name(compose(["method=snapkv", "budget=64", "method.decode_interval=16"])) == "snapkv_64_decode16"


def test_report_keeps_decode_time_runs_apart_and_labelled(tmp_path):
    import json

    from kvbench.report.collect import collect
    from kvbench.report.tables import longbench_table
    from test_report import write_run

    model = {"name": "m", "hub_id": "m"}
    write_run(tmp_path, model, "snapkv", 128, {"qasper": 30.0})
    decode = write_run(tmp_path, model, "snapkv", 128, {"qasper": 20.0}, folder="snapkv_128_decode16")
    run = json.loads((decode / "run.json").read_text())
    run["method"]["decode_interval"] = 16
    (decode / "run.json").write_text(json.dumps(run))
    df = collect(tmp_path).set_index("decode_interval")
    assert set(df["method"]) == {"SnapKV"}  # the schedule is a column, not a label suffix
    assert df.loc[0, "score"] == 30.0 and df.loc[16, "score"] == 20.0
    lines = longbench_table(collect(tmp_path)).splitlines()
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[3:5]]
    decode_col, score_col = header.index("Decode"), header.index("Qasper")
    assert [(r[decode_col], r[score_col]) for r in rows] == [("prefill", "30.00"), ("every 16", "20.00")]  # prefill first


@pytest.mark.parametrize("name", ["snapkv", "adakv", "h2o", "cake"])
def test_ask_many_answers_every_question_from_the_same_compressed_context(tiny_llama, name):
    """Decoding-time cuts change the layers the answer decodes in, a fork of the context's; the context stays as
    compressed, so a question answered from a reused context gets exactly the tokens of a fresh compression."""
    from kvbench.engine import ContextCache

    model, tok = tiny_llama
    ids = random_prompt(PROMPT, len(tok), seed=6)
    ctx, questions = ids[:, :100], [ids[:, 100:110], ids[:, 110:120]]
    contexts, shared = ContextCache(), decoding_method(name, budget=48)
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW)
    for q in questions + questions[::-1]:
        fresh = generate(model, ctx, decoding_method(name, budget=48), question_ids=q, **kwargs)
        reused = generate(model, ctx, shared, question_ids=q, contexts=contexts, **kwargs)
        assert reused.token_ids == fresh.token_ids and reused.decode_cuts == NEW // INTERVAL
    assert contexts.reuses == 3


@pytest.mark.parametrize("local_layers", ["keep", "compress"])
@pytest.mark.parametrize("model_name", ["tiny_qwen2_sliding", "tiny_gemma3"])
def test_hybrid_models_decode_with_the_schedule(model_name, local_layers):
    """Sliding-window models: compressed layers are cut back to the budget, layers left as the model defines them
    keep their window, and decoding respects every window (FullKV tokens when nothing needs cutting)."""
    from conftest import cached_model

    model, tok = cached_model(model_name)
    ids = random_prompt(160, len(tok), seed=7)
    method = paper("snapkv", budget=24, decode_interval=INTERVAL, local_layers=local_layers)
    state = prefill(model, ids, method)
    cache, schedule = state.cache, schedule_for(method, model)
    token = state.logits.argmax(-1, keepdim=True)
    for step in range(3 * INTERVAL):
        token = decode_step(model, token, 160 + step, cache, schedule).argmax(-1, keepdim=True)
        for i, layer in enumerate(cache.layers):
            limit = 24 + INTERVAL if cache.rank(i) is not None else cache.kinds[i].window
            assert head_peak(layer) <= limit, f"layer {i} ({cache.kinds[i].short()}) step {step}"
    assert schedule.cuts == 3
    big = paper("snapkv", budget=400, decode_interval=INTERVAL, local_layers=local_layers)
    kwargs = dict(max_new_tokens=2 * INTERVAL, min_new_tokens=2 * INTERVAL)
    assert generate(model, ids, big, **kwargs).token_ids == generate(model, ids, None, **kwargs).token_ids
