"""Query-agnostic evaluation: two-phase prefill (context compressed alone, question fed uncompressed at its true
positions), compress-once-ask-many (each question in a fork of the context's cache), and the context/question split
of every prompt."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import random_prompt
from kvbench.engine import (ContextCache, ask, cache_lengths, compress_context, generate, generate_agnostic,
                            greedy_decode, prefill, question_forward)
from kvbench.methods import build_method, registry

torch.set_num_threads(1)
CONTEXT, QUESTION, NEW = 300, 20, 10
SELECTING = ["snapkv", "pyramidkv", "dynamickv", "h2o"]


def method(name: str, budget: int = 64, model=None, tok=None):
    m = build_method(name) if name == "fullkv" else build_method(name, budget=budget, window_size=8)
    if model is not None:
        m.bind(model, tok)  # methods that need the model (Expected Attention, KVzip), as the pipeline does
    return m


def split(tok, seed=0, context=CONTEXT, question=QUESTION):
    ids = random_prompt(context + question, len(tok), seed=seed)
    return ids[:, :context], ids[:, context:]


# ---- engine: two-phase prefill ------------------------------------------------------------------------------------
def test_fullkv_agnostic_equals_aware_tokens_and_logits(tiny):
    model, tok = tiny
    ctx, q = split(tok)
    aware = generate(model, torch.cat([ctx, q], 1), None, max_new_tokens=NEW)
    agnostic = generate(model, ctx, None, max_new_tokens=NEW, question_ids=q)
    assert agnostic.token_ids == aware.token_ids
    assert agnostic.prompt_tokens == aware.prompt_tokens == CONTEXT + QUESTION
    assert agnostic.context_tokens == CONTEXT and agnostic.log_fields()["question_tokens"] == QUESTION
    # The last-position logits of one-pass and two-pass prefill agree to float precision.
    one = prefill(model, torch.cat([ctx, q], 1)).logits
    two = compress_context(model, ctx)
    two_logits = question_forward(model, q, CONTEXT, two.prefilled.cache)
    assert torch.allclose(one, two_logits, atol=1e-4, rtol=1e-4), (one - two_logits).abs().max()


@pytest.mark.parametrize("name", registry.names(builtin_only=True))
def test_every_method_runs_agnostic_and_keeps_context_only(tiny_llama, name):
    model, tok = tiny_llama
    ctx, q = split(tok, seed=1)
    out = generate(model, ctx, method(name, model=model, tok=tok), max_new_tokens=NEW, question_ids=q)
    assert len(out.token_ids) == NEW or out.stopped == "stop_token"
    layers = model.config.num_hidden_layers
    if name == "fullkv":
        assert out.layer_kept == [CONTEXT] * layers
    else:
        assert max(out.layer_kept) <= CONTEXT and sum(out.layer_kept) < CONTEXT * layers
    assert out.log_fields()["compressed"] == (name != "fullkv")


def test_question_positions_continue_after_uncompressed_context(tiny_llama):
    model, tok = tiny_llama
    ctx, q = split(tok, seed=2)
    seen = []
    hook = model.model.rotary_emb.register_forward_hook(lambda mod, args, kwargs, out: seen.append(
        kwargs["position_ids"].flatten().tolist()), with_kwargs=True)
    try:
        out = generate(model, ctx, method("snapkv"), max_new_tokens=3, question_ids=q)
    finally:
        hook.remove()
    assert out.layer_kept == [64] * model.config.num_hidden_layers
    assert seen[0] == list(range(CONTEXT))
    assert seen[1] == list(range(CONTEXT, CONTEXT + QUESTION))
    assert seen[2] == [CONTEXT + QUESTION] and seen[3] == [CONTEXT + QUESTION + 1]


def test_question_forward_equals_token_by_token_over_compressed_cache(tiny):
    """The one-pass question forward (its own mask over per-query-head, compressed layers) gives the logits of
    feeding the question one token at a time, for uniform (SnapKV) and per-layer (PyramidKV) budgets."""
    model, tok = tiny
    ctx, q = split(tok, seed=3)
    for name in ("snapkv", "pyramidkv"):
        a = compress_context(model, ctx, method(name))
        one_pass = question_forward(model, q, CONTEXT, a.prefilled.cache)
        b = compress_context(model, ctx, method(name))
        for i in range(QUESTION):
            step = question_forward(model, q[:, i:i + 1], CONTEXT + i, b.prefilled.cache)
        assert torch.allclose(one_pass, step, atol=1e-4, rtol=1e-4), (name, (one_pass - step).abs().max())


@pytest.mark.parametrize("name", SELECTING)
def test_agnostic_kept_set_does_not_depend_on_question(tiny_llama, name):
    model, tok = tiny_llama
    ctx, q1 = split(tok, seed=4)
    q2 = random_prompt(QUESTION, len(tok), seed=99)
    kept = []
    for q in (q1, q2):
        contexts = ContextCache()
        generate(model, ctx, method(name), max_new_tokens=2, question_ids=q, contexts=contexts)
        kept.append(contexts.current.prefilled.cache.kept_positions())
    assert kept[0] == kept[1]
    # Control: in aware mode the question is in the observation window and changes what is kept.
    aware = [prefill(model, torch.cat([ctx, q], 1), method(name)).cache.kept_positions() for q in (q1, q2)]
    assert aware[0] != aware[1]


# ---- compress once, ask many --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", registry.names(builtin_only=True))
def test_ask_many_equals_fresh_compression(tiny, name):
    model, tok = tiny
    ctx, _ = split(tok, seed=5)
    questions = [random_prompt(QUESTION + i, len(tok), seed=50 + i) for i in range(3)]
    contexts = ContextCache()
    m = method(name, model=model, tok=tok)
    many = [generate(model, ctx, m, max_new_tokens=NEW, question_ids=q, contexts=contexts) for q in questions]
    fresh = [generate_agnostic(model, ctx, q, method(name, model=model, tok=tok), max_new_tokens=NEW)
             for q in questions]
    assert [o.token_ids for o in many] == [o.token_ids for o in fresh]
    assert [o.context_reused for o in many] == [False, True, True]
    assert many[1].prefill_s == 0.0 and many[0].prefill_s > 0
    assert contexts.stats()["context_prefills"] == 1 and contexts.stats()["context_prefills_avoided"] == 2
    # After the last answer the cache holds exactly the compressed context again.
    assert [layer.get_seq_length() for layer in contexts.current.prefilled.cache.layers] == contexts.current.lengths


def test_context_cache_misses_on_other_context_or_method(tiny_llama):
    model, tok = tiny_llama
    ctx, q = split(tok, seed=6)
    other = ctx.clone()
    other[0, 5] = (other[0, 5] + 1) % len(tok)
    contexts = ContextCache()
    m1, m2 = method("snapkv"), method("snapkv")
    reused = [generate(model, c, m, max_new_tokens=2, question_ids=q, contexts=contexts).context_reused
              for c, m in ((ctx, m1), (ctx, m1), (other, m1), (other, m2))]
    assert reused == [False, True, False, False]


def test_a_question_leaves_the_compressed_context_as_it_was(tiny_llama):
    """A question is fed and answered in a fork of the context's cache (with a decode schedule, on a copy of the
    method's per-sample state): the context keeps its layers, lengths and kept positions for the next question."""
    from test_decoding import decoding_method

    model, tok = tiny_llama
    ctx, q = split(tok, seed=7)
    for m in (method("pyramidkv"), decoding_method("h2o", budget=48, interval=2)):
        c = compress_context(model, ctx, m)
        cache = c.prefilled.cache
        layers, kept = list(cache.layers), cache.kept_positions()
        state = ask(model, c, q, m)
        greedy_decode(model, state.logits, state.cache, state.seen, state.position, max_new_tokens=NEW,
                      schedule=state.schedule)
        fork = (cache_lengths(state.cache), state.cache.kept_positions())
        assert fork != (c.lengths, kept)  # the question and answer went to the fork (grown, or cut)
        assert (state.schedule is not None and state.schedule.cuts > 0) == (m.name == "h2o")
        assert all(a is b for a, b in zip(cache.layers, layers)) and len(cache.layers) == len(layers)
        assert cache_lengths(cache) == c.lengths and cache.kept_positions() == kept


# ---- the split: context + question ids == the aware prompt's ids --------------------------------------------------
from conftest import protocol_preset as get_protocol  # noqa: E402
from kvbench.longbench.protocol import (PROMPTS, build_prompt, build_split_prompt, question_kind,  # noqa: E402
                                        split_template)
from kvbench.models import EMBEDDED, load_tokenizer  # noqa: E402
from kvbench.needle.prompt import (build_context_ids, build_multi_context_ids, build_prompt_ids,  # noqa: E402
                                   build_split_prompt_ids, needle_question)

CUES = {"trec": "Type:", "triviaqa": "Answer:", "samsum": "Summary:"}
WORDS = ("The committee met on Tuesday. It discussed the budget, the new library and the river bridge. "
         "Several members asked questions about costs.\n")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMBEDDED)


def example(task: str, words: int = 3, question_words: int = 1):
    body = WORDS * words
    question = "What did the committee discuss about the library and its opening hours? " * question_words
    if task in CUES:
        question = f"{question}\n{CUES[task]}"
    return {"context": body, "input": question, "length": 0}


def test_template_split_covers_every_task():
    assert set(PROMPTS) == set(split_template.__globals__["QUESTION_STARTS"])
    for task in PROMPTS:
        ctx, q = split_template(task)
        assert ctx + q == PROMPTS[task] and "{context}" in ctx and "{context}" not in q
        assert ("{input}" in q) == (question_kind(task) == "input")
    assert question_kind("gov_report") == "fixed_instruction" and question_kind("lcc") == "answer_cue_only"
    assert split_template("narrativeqa")[0].endswith("Do not provide any explanation.\n\n")
    assert split_template("passage_retrieval_en")[1].startswith("{input}\n\nPlease enter the number")


@pytest.mark.parametrize("protocol", ["dynamickv", "official"])
@pytest.mark.parametrize("task", sorted(PROMPTS))
def test_longbench_split_equals_aware_tokens(tok, task, protocol):
    proto = get_protocol(protocol)
    for words, max_len in ((3, None), (40, 400)):  # untruncated, and middle-truncated (question kept whole)
        ex = example(task, words)
        split, aware = build_split_prompt(task, ex, tok, proto, max_len)
        assert split.input_ids == build_prompt(task, ex, tok, proto, max_len).input_ids == aware.input_ids
        assert split.context_ids and split.question_ids
        q_text = tok.decode(split.question_ids)
        if question_kind(task) == "input":
            assert "library and its opening hours" in q_text
            assert "library and its opening hours" not in tok.decode(split.context_ids)
        assert aware.truncated == (max_len is not None)
        assert split.info["split_truncation"] == ("whole_prompt" if max_len else None)


def test_long_question_truncates_the_context_part_only(tok):
    proto = get_protocol("dynamickv")
    ex = example("repobench-p", words=40, question_words=30)  # the question alone is > max_len / 2
    split, aware = build_split_prompt("repobench-p", ex, tok, proto, 600)
    assert split.info["split_truncation"] == "context_only"
    assert len(split.input_ids) <= 600 + 2
    assert tok.decode(split.question_ids) == ex["input"] + "Next line of code:\n"
    assert tok.decode(split.context_ids, skip_special_tokens=True).startswith("Please complete the code")


def test_longbench_split_on_shared_files(tok):
    from conftest import SHARED_LONGBENCH
    from kvbench.longbench.data import DataSource, load_task
    if not SHARED_LONGBENCH.is_dir():  # a worktree outside /work/main: the shared folder by its absolute path
        SHARED_LONGBENCH = Path("/work/shared/data/longbench")
    if not SHARED_LONGBENCH.is_dir():
        pytest.skip("shared LongBench files not present")
    for task in ("multi_news", "multifieldqa_zh", "passage_retrieval_zh"):
        for ex in load_task(task, DataSource(path=str(SHARED_LONGBENCH), limit=3)):
            for protocol in ("dynamickv", "official"):
                proto = get_protocol(protocol)
                split, aware = build_split_prompt(task, ex, tok, proto, 2048)
                assert split.input_ids == aware.input_ids


@pytest.mark.parametrize("preset", ["raw", "chat"])
def test_needle_split_equals_aware_tokens(tok, preset):
    haystack = tok.encode(WORDS * 60, add_special_tokens=False)
    for needle in (0, 3):
        for depth in (0, 50, 100):
            ctx = build_context_ids(tok, haystack, 900, depth)[0]
            split = build_split_prompt_ids(tok, ctx, preset, needle=needle)
            assert split.input_ids == build_prompt_ids(tok, ctx, preset, needle=needle)
            question = needle_question(needle)[1 if preset == "raw" else 2]
            assert question.strip() in tok.decode(split.question_ids)
            assert tok.decode(split.context_ids).rstrip().endswith("</book>." if preset == "raw" else "")
            assert "Question" not in tok.decode(split.context_ids)[-80:]


def test_multi_needle_context(tok):
    haystack = tok.encode(WORDS * 80, add_special_tokens=False)
    depths = [0, 33, 67, 100]
    ids, starts = build_multi_context_ids(tok, haystack, 1200, depths)
    assert len(ids) <= 1200 - 200 and starts == sorted(starts)
    for i, start in enumerate(starts):
        needle = tok.encode(needle_question(i)[0], add_special_tokens=False)
        assert ids[start:start + len(needle)] == needle
    assert starts[-1] + len(tok.encode(needle_question(3)[0], add_special_tokens=False)) == len(ids)


# ---- end to end: config, run folders, records ---------------------------------------------------------------------
import json  # noqa: E402

from kvbench.config import compose, output_dir  # noqa: E402
from kvbench.errors import KvbenchError  # noqa: E402
from kvbench.pipeline import evaluate, prepare  # noqa: E402
from kvbench.results import read_predictions  # noqa: E402

SHARED = Path("/work/shared/data/longbench")
LB_TASK = "passage_retrieval_zh"


def lb_overrides(tmp_path, *extra):
    return ["model=tiny_llama", f"benchmark.data_dir={SHARED}", f"benchmark.tasks=[{LB_TASK}]",
            f"results_root={tmp_path}", "progress=false", "benchmark.limit=2", *extra]


def test_query_setting_names_the_folder_and_is_validated(tmp_path):
    assert compose([]).benchmark.query == "aware" and compose(["benchmark=needle"]).benchmark.query == "aware"
    cfg = compose(lb_overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.query=agnostic"))
    assert output_dir(cfg).name == "snapkv_64_agnostic"
    assert output_dir(compose(lb_overrides(tmp_path, "method=snapkv", "budget=64"))).name == "snapkv_64"
    needle = compose(["benchmark=needle", "benchmark.query=agnostic", "benchmark.multi_needle=true",
                      "method=fullkv"])
    assert output_dir(needle).name == "fullkv_agnostic_multineedle"
    with pytest.raises(KvbenchError, match="benchmark.query"):
        prepare(compose(lb_overrides(tmp_path, "benchmark.query=blind")))
    with pytest.raises(KvbenchError, match="distinct needles"):
        prepare(compose(["benchmark=needle", "benchmark.multi_needle=true", "benchmark.grid.depths=11"]))


def test_longbench_agnostic_run_fullkv_equals_aware(tmp_path):
    if not SHARED.is_dir():
        pytest.skip("shared LongBench files not present")
    preds = {}
    for query in ("aware", "agnostic"):
        cfg = compose(lb_overrides(tmp_path, "method=fullkv", f"benchmark.query={query}"))
        evaluate(cfg)
        preds[query] = read_predictions(output_dir(cfg) / "predictions" / f"{LB_TASK}.jsonl")
    run = json.loads((output_dir(cfg) / "run.json").read_text())
    assert run["settings"]["benchmark"]["query"] == "agnostic" and run["config"]["benchmark"]["query"] == "agnostic"
    aware, agnostic = ({r["_id"]: r for r in preds[q]} for q in ("aware", "agnostic"))
    assert aware.keys() == agnostic.keys()
    for key, r in agnostic.items():
        assert r["pred"] == aware[key]["pred"] and r["prompt_tokens"] == aware[key]["prompt_tokens"]
        assert r["query"] == "agnostic" and r["context_part_tokens"] + r["question_tokens"] == r["prompt_tokens"]
        assert r["split"]["question_kind"] == "input" and r["question_prefill_s"] >= 0
        assert "query" not in aware[key]


def test_needle_multi_needle_agnostic_compresses_each_haystack_once(tmp_path):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("The sky was grey over the harbour. Boats came in slowly. " * 80)
    base = ["model=tiny_llama", "benchmark=needle", f"benchmark.haystack_dir={hay}", "method=snapkv", "budget=64",
            f"results_root={tmp_path}", "progress=false", "benchmark.grid.start=500", "benchmark.grid.end=700",
            "benchmark.grid.step=200", "benchmark.grid.depths=3", "benchmark.multi_needle=true"]
    runs = {}
    for query in ("aware", "agnostic"):
        cfg = compose(base + [f"benchmark.query={query}"])
        evaluate(cfg)
        runs[query] = read_predictions(output_dir(cfg) / "predictions" / "needle.jsonl")
    agnostic = runs["agnostic"]
    assert [r["needle"] for r in agnostic] == [0, 1, 2] * 2
    assert [r["context_reused"] for r in agnostic] == [False, True, True] * 2
    assert len({r["needle_index"] for r in agnostic[:3]}) == 3
    timing = json.loads((output_dir(cfg) / "run.json").read_text())["timing"]  # the folder's totals
    assert timing["context_prefills"] == 2 and timing["context_prefills_avoided"] == 4
    assert timing["context_prefill_s_avoided"] > 0
    # Same prompts in both modes; the aware run compresses haystack + question anew for every needle.
    assert [r["input_tokens"] for r in agnostic] == [r["input_tokens"] for r in runs["aware"]]
    assert all(r["layer_kept"] == [64] * 4 for r in agnostic)


# ---- the embedded SmolLM2 (slow) ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_fullkv_agnostic_equals_aware_and_ask_many(smollm2):
    from kvbench.needle.haystack import haystack_token_ids, load_haystack
    model, tok = smollm2
    haystack = haystack_token_ids(tok, load_haystack(), 2000)
    depths = [0, 50, 100]
    ctx_ids, _ = build_multi_context_ids(tok, haystack, 2000, depths)
    splits = [build_split_prompt_ids(tok, ctx_ids, "chat", needle=i) for i in range(len(depths))]
    assert len({tuple(s.context_ids) for s in splits}) == 1  # one context for the three questions
    ctx = torch.tensor([splits[0].context_ids])
    questions = [torch.tensor([s.question_ids]) for s in splits]
    # FullKV: two-pass prefill gives the one-pass tokens, and the logits agree to float precision.
    for s, q in zip(splits, questions):
        aware = generate(model, torch.tensor([s.input_ids]), None, max_new_tokens=16)
        agnostic = generate(model, ctx, None, max_new_tokens=16, question_ids=q)
        assert agnostic.token_ids == aware.token_ids, tok.decode(aware.token_ids)
    one = prefill(model, torch.tensor([splits[0].input_ids])).logits
    two = compress_context(model, ctx)
    gap = (one - question_forward(model, questions[0], ctx.shape[1], two.prefilled.cache)).abs().max().item()
    assert gap < 1e-3, gap
    # Ask many from one compressed cache == compressing anew for each question (SnapKV, DynamicKV).
    for name in ("snapkv", "dynamickv"):
        contexts = ContextCache()
        m = build_method(name, budget=128)
        many = [generate(model, ctx, m, max_new_tokens=16, question_ids=q, contexts=contexts).token_ids
                for q in questions]
        fresh = [generate_agnostic(model, ctx, q, build_method(name, budget=128), max_new_tokens=16).token_ids
                 for q in questions]
        assert many == fresh and contexts.stats()["context_prefills"] == 1


# ---- reports: the query mode is shown, and the gap view ----------------------------------------------------------
def test_query_gap_view():
    import pandas as pd
    from kvbench.report.query_gap import query_gap, query_gap_markdown
    rows = []
    for method, query, task, score in [("SnapKV", "aware", "a", 50), ("SnapKV", "aware", "b", 30),
                                       ("SnapKV", "agnostic", "a", 40),  # b not run agnostic
                                       ("SnapKV", "aware", "needle", 90), ("SnapKV", "agnostic", "needle", 60),
                                       ("H2O", "aware", "a", 10)]:
        rows.append({"model": "m", "method": method, "budget": 128.0, "query": query, "task": task, "score": score,
                     "benchmark": "needle" if task == "needle" else "longbench", "variant": ""})
    # A variant (the K-needle haystack) pairs only with its own variant, never with the single-needle runs: the
    # settings are columns, never parsed out of folder names or labels.
    rows.append({"model": "m", "method": "SnapKV", "budget": 128.0, "query": "agnostic", "task": "needle",
                 "score": 0, "benchmark": "needle", "variant": "multi-needle"})
    gap = query_gap(pd.DataFrame(rows))
    assert gap[["benchmark", "method", "tasks", "aware", "agnostic", "gap"]].values.tolist() == [
        ["longbench", "SnapKV", 1, 50.0, 40.0, 10.0], ["needle", "SnapKV", 1, 90.0, 60.0, 30.0]]
    assert "| m | needle |  | prefill | SnapKV | 128 | 1 | 90.00 | 60.00 | +30.00 |" in query_gap_markdown(pd.DataFrame(rows))
    rows[-1]["variant"] = ""  # the same settings: now it competes for the same cell (mean of the two agnostic runs)
    assert query_gap(pd.DataFrame(rows))["agnostic"].tolist() == [40.0, 30.0]


def test_agnostic_refuses_hybrid_models_clearly():
    from conftest import cached_model
    model, tok = cached_model("tiny_gemma3")
    ctx, q = split(tok, seed=8)
    with pytest.raises(KvbenchError, match="benchmark.query=aware"):
        generate(model, ctx, None, max_new_tokens=2, question_ids=q)


def test_agnostic_records_tokens_per_head_like_aware_for_ragged_layers(tiny_llama):
    """AdaKV layers hold different counts per head: the agnostic record must report tokens per head (the mean, as
    aware mode does), so that kv_tokens x stored heads x head size equals kv_bytes, not the longest head."""
    model, tok = tiny_llama
    ctx, q = split(tok, seed=9)
    out = generate(model, ctx, method("adakv", model=model, tok=tok), max_new_tokens=2, question_ids=q)
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    stored_heads = cfg.num_attention_heads  # adakv stores one list per query head
    assert out.kv_bytes == round(2 * out.kv_tokens * stored_heads * head_dim * 4)
