"""Multi-turn sessions (`benchmark.session=true`, multiturn.generate_session, kvbench.sessions): turn boundaries cut
every layer back to its budget, FullKV equals one long `generate` of the same conversation, gold vs model answers,
resume after a kill, the fingerprint, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import random_prompt
from kvbench.benchmark import Benchmark, Prompt, Sample
from kvbench.config import compose, output_dir
from kvbench.decoding import head_peak, session_refusal
from kvbench.engine import generate
from kvbench.multiturn import generate_session
from kvbench.scheduler import generate_requests
from kvbench.errors import KvbenchError
from kvbench.methods import registry
from kvbench.ragged import RaggedLayer
from kvbench.requests import Request, Turn
from test_methods_generic import paper

CONTEXT, NEW = 150, 6
NAMES = registry.names(builtin_only=True)
CUTTING = [name for name in NAMES if name != "fullkv" and registry.get(name).cls.decode_refusal is None]


def ids(n: int, vocab: int, seed: int) -> tuple[int, ...]:
    return tuple(random_prompt(n, vocab, seed)[0].tolist())


def make_turns(vocab: int, k: int = 3) -> list[Turn]:
    return [Turn(ids(7 + i, vocab, 10 + i), ids(5, vocab, 20 + i), ids(2, vocab, 30 + i)) for i in range(k)]


def session_method(name: str, budget: int, **extra):
    needs = getattr(registry.get(name).cls, "decode_settings", {})
    return paper(name, budget=budget, **needs, **extra)


@pytest.mark.parametrize("answers", ["gold", "model"])
def test_fullkv_session_equals_one_long_generate_of_the_conversation(tiny, answers):
    model, tok = tiny
    context, turns = random_prompt(CONTEXT, len(tok), 1), make_turns(len(tok))
    stops = (int(ids(1, len(tok), 99)[0]),)
    out = generate_session(model, context, turns, None, max_new_tokens=NEW, answers=answers, stop_token_ids=stops)
    conversation = context[0].tolist()
    for i, turn in enumerate(turns):
        conversation += list(turn.question_ids)
        ref = generate(model, torch.tensor([conversation]), None, max_new_tokens=NEW, stop_token_ids=stops)
        got = out.turns[i]
        assert got.token_ids == ref.token_ids and got.position + got.question_tokens == len(conversation)
        if answers == "gold":
            conversation += list(turn.answer_ids)
        else:  # the model's answer (a stop token gives way to the close) and the turn's close
            own = got.token_ids[:-1] if got.stopped == "stop_token" else got.token_ids
            conversation += own + list(turn.close_ids)
    assert out.token_ids == [t for turn in out.turns for t in turn.token_ids]


def test_gold_and_model_answers_keep_different_conversations(tiny_llama):
    model, tok = tiny_llama
    context, turns = random_prompt(CONTEXT, len(tok), 2), make_turns(len(tok))
    gold = generate_session(model, context, turns, None, max_new_tokens=NEW, answers="gold")
    own = generate_session(model, context, turns, None, max_new_tokens=NEW, answers="model")
    assert gold.turns[0].token_ids == own.turns[0].token_ids  # turn 1 sees the same conversation
    # Gold: turn 2 starts after the 5 gold tokens; model: after the model's 6 tokens and the 2-token close.
    assert gold.turns[1].position == CONTEXT + 7 + 5 and own.turns[1].position == CONTEXT + 7 + NEW + 2
    assert [t.answer_tokens for t in gold.turns] == [5, 5, 5]
    assert gold.turns[1].token_ids != own.turns[1].token_ids


@pytest.mark.parametrize("interval", [None, 4])
@pytest.mark.parametrize("name", CUTTING)
def test_turn_boundaries_cut_every_layer_back_to_its_budget(tiny_llama, name, interval):
    model, tok = tiny_llama
    method = session_method(name, 64, decode_interval=interval)
    method.bind(model, tok)
    context, turns = random_prompt(CONTEXT, len(tok), 3), make_turns(len(tok), 4)
    totals = []

    def on_turn(i, out):  # per layer, the tokens all heads hold together after this turn's boundary
        totals.append(layer_totals(cache_of["cache"]) if out.kv_tokens_after is not None else None)

    cache_of = spy_cache()
    try:
        out = generate_session(model, context, turns, method, max_new_tokens=NEW, answers="model", on_turn=on_turn)
    finally:
        cache_of["restore"]()
    after_prefill = cache_of["prefill_totals"]
    held = max(head_peak(layer) for layer in cache_of["prefill_layers"])
    ragged = any(isinstance(layer, RaggedLayer) for layer in cache_of["prefill_layers"])
    heads = max(len(layer.positions) for layer in cache_of["prefill_layers"]) if ragged else 0
    for turn, total in zip(out.turns, totals):
        one_turn = turn.question_tokens + len(turn.token_ids) + turn.answer_tokens  # question, answer, boundary
        assert turn.peak_kv_tokens <= held + one_turn  # no head above the last cut's size plus one turn's tokens
        if total is not None:  # every layer back to what the context's compression left it, or less
            # (at most: chunk methods keep whole chunks; a head-adaptive allocation over other scores rounds to
            # within a token per head)
            assert all(t <= p + heads for t, p in zip(total, after_prefill)), (name, total, after_prefill)
            held = turn.kv_tokens_after
    assert out.decode_cuts is not None and out.decode_cuts >= len(turns) - 1
    assert max(t.peak_kv_tokens for t in out.turns) > held  # the turns did grow the cache between the cuts


def layer_totals(cache) -> list[int]:
    return [sum(len(p) for p in layer.positions) + layer.tail_keys.shape[-2] * layer.heads_stored
            if isinstance(layer, RaggedLayer) else int(layer.held()) * layer.keys.shape[1] for layer in cache.layers]


def spy_cache() -> dict:
    """Catch the session's cache (and its state right after the context's compression) from the engine."""
    from kvbench import multiturn

    found = {}
    original = multiturn.compress_context

    def spy(*args, **kwargs):
        context = original(*args, **kwargs)
        found["cache"] = context.prefilled.cache
        found["prefill_totals"] = layer_totals(found["cache"])
        found["prefill_layers"] = list(found["cache"].layers)
        return context

    multiturn.compress_context = spy
    found["restore"] = lambda: setattr(multiturn, "compress_context", original)
    return found


@pytest.mark.parametrize("answers", ["gold", "model"])
def test_a_killed_session_resumes_at_its_first_unanswered_turn_with_the_same_answers(tiny_llama, answers):
    model, tok = tiny_llama
    method = session_method("h2o", 64, decode_interval=3)
    context, turns = random_prompt(CONTEXT, len(tok), 5), make_turns(len(tok), 4)
    whole = generate_session(model, context, turns, method, max_new_tokens=NEW, answers=answers)

    class Killed(Exception):
        pass

    done = []

    def kill_after_two(i, out):
        done.append(out.token_ids)
        if i == 1:
            raise Killed

    with pytest.raises(Killed):
        generate_session(model, context, turns, method, max_new_tokens=NEW, answers=answers, on_turn=kill_after_two)
    resumed = generate_session(model, context, turns, method, max_new_tokens=NEW, answers=answers,
                               answered=done)
    assert [t.token_ids for t in resumed.turns] == [t.token_ids for t in whole.turns]
    assert [t.replayed for t in resumed.turns] == [True, True, False, False]
    assert [t.peak_kv_tokens for t in resumed.turns[2:]] == [t.peak_kv_tokens for t in whole.turns[2:]]
    if answers == "model":  # a recorded answer that greedy decoding no longer gives is refused
        wrong = [list(done[0]), [done[1][0] + 1] + list(done[1][1:])]
        with pytest.raises(KvbenchError, match="does not reproduce"):
            generate_session(model, context, turns, method, max_new_tokens=NEW, answers=answers, answered=wrong)


def test_generate_requests_dispatches_a_session_request(tiny_llama):
    model, tok = tiny_llama
    context, turns = random_prompt(CONTEXT, len(tok), 6), make_turns(len(tok), 2)
    method = session_method("snapkv", 64)
    seen = []
    request = Request(context[0].tolist(), NEW, turns=tuple(turns), session_answers="model", key="s")
    (got, out), = generate_requests(model, [request], method, on_turn=lambda r, i, t: seen.append((r.key, i)))
    direct = generate_session(model, context, turns, method, max_new_tokens=NEW, answers="model")
    assert got is request and seen == [("s", 0), ("s", 1)]
    assert [t.token_ids for t in out.turns] == [t.token_ids for t in direct.turns]


def test_sessions_amid_a_batch_run_alone_and_keep_their_answers(tiny_llama):
    """batch_size > 1: a session request runs alone (its turns in order) while plain requests decode batched; each
    answer equals its batch-1 answer."""
    model, tok = tiny_llama
    context, turns = random_prompt(CONTEXT, len(tok), 6), make_turns(len(tok), 2)
    method = session_method("snapkv", 64)
    plain = [Request(random_prompt(90 + 7 * i, len(tok), 20 + i)[0].tolist(), NEW, key=f"p{i}") for i in range(3)]
    session = Request(context[0].tolist(), NEW, turns=tuple(turns), session_answers="model", key="s")
    requests = [plain[0], session, plain[1], plain[2]]
    seen = []
    batched = {r.key: o for r, o in generate_requests(model, requests, method, batch_size=3,
                                                     on_turn=lambda r, i, t: seen.append((r.key, i)))}
    alone = {r.key: o for r, o in generate_requests(model, requests, method)}
    assert seen == [("s", 0), ("s", 1)] and sorted(batched) == sorted(alone)
    for key, out in alone.items():
        assert batched[key].token_ids == out.token_ids
    assert [t.token_ids for t in batched["s"].turns] == [t.token_ids for t in alone["s"].turns]


@pytest.mark.parametrize("name", NAMES)
def test_a_method_either_cuts_at_turn_boundaries_or_is_refused_with_its_reason(tiny_llama, name):
    model, tok = tiny_llama
    method = session_method(name, 64) if name != "fullkv" else registry.build("fullkv")
    reason = session_refusal(method)
    context, turns = random_prompt(CONTEXT, len(tok), 7), make_turns(len(tok), 2)
    if reason is None:
        method.bind(model, tok)
        assert len(generate_session(model, context, turns, method, max_new_tokens=2).turns) == 2
        return
    assert reason == registry.get(name).cls.decode_refusal
    with pytest.raises(KvbenchError, match="cannot compress at a session's turn boundaries") as err:
        generate_session(model, context, turns, method, max_new_tokens=2)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_h2o_sessions_need_its_causal_mode():
    assert "set method.mode=causal" in session_refusal(registry.build("h2o", budget=64))
    assert session_refusal(registry.build("h2o", budget=64, mode="causal")) is None


# ---- the pipeline: needle sessions, settings, bad input --------------------------------------------------------
def needle_overrides(tmp_path, *extra):
    hay = tmp_path / "hay"
    hay.mkdir(exist_ok=True)
    (hay / "a.txt").write_text("The sky was grey over the harbour. Boats came in slowly. " * 80)
    return ["model=tiny_llama", "benchmark=needle", f"benchmark.haystack_dir={hay}", "method=snapkv", "budget=64",
            f"results_root={tmp_path}", "progress=false", "benchmark.grid.start=500", "benchmark.grid.end=700",
            "benchmark.grid.step=200", "benchmark.grid.depths=3", "benchmark.multi_needle=true",
            "benchmark.session=true", *extra]


def test_bad_session_input_is_refused_before_the_model_loads(tmp_path):
    from kvbench.pipeline import prepare

    base = needle_overrides(tmp_path)
    with pytest.raises(KvbenchError, match="session_answers='both'"):
        prepare(compose(base + ["benchmark.session_answers=both"]))
    with pytest.raises(KvbenchError, match="needs questions that share a context.*multi_needle=true"):
        prepare(compose(base + ["benchmark.multi_needle=false"]))
    with pytest.raises(KvbenchError, match="kvzip cannot compress at a session's turn boundaries"):
        prepare(compose([o for o in base if not o.startswith("method=")] + ["method=kvzip"]))
    with pytest.raises(KvbenchError, match="set method.mode=causal"):
        prepare(compose([o for o in base if not o.startswith("method=")] + ["method=h2o"]))


def test_session_settings_are_in_the_fingerprint_and_the_folder(tmp_path):
    from kvbench.pipeline import prepare, settings_of

    gold = prepare(compose(needle_overrides(tmp_path)))
    model = prepare(compose(needle_overrides(tmp_path, "benchmark.session_answers=model")))
    ask_many = prepare(compose(needle_overrides(tmp_path, "benchmark.session=false", "benchmark.query=agnostic")))
    fingerprint = settings_of(gold)["benchmark"]
    assert fingerprint["session"] is True and fingerprint["turn_order"] == [0, 1, 2]
    assert fingerprint["session_answers"] == "gold" and settings_of(model)["benchmark"]["session_answers"] == "model"
    assert "session" not in settings_of(ask_many)["benchmark"]
    assert [job.out.name for job in (gold, model, ask_many)] == [
        "snapkv_64_multineedle_session", "snapkv_64_multineedle_sessionmodel", "snapkv_64_agnostic_multineedle"]


@pytest.mark.parametrize("prompt", ["raw", "chat"])
def test_needle_session_run_scores_each_turn_and_resumes_after_a_kill(tmp_path, prompt, monkeypatch):
    from kvbench.pipeline import evaluate
    from kvbench.results import read_predictions

    overrides = needle_overrides(tmp_path, f"benchmark.prompt={prompt}", "benchmark.session_answers=model")
    cfg = compose(overrides)
    scores = evaluate(cfg)
    records = read_predictions(output_dir(cfg) / "predictions" / "needle.jsonl")
    assert [(r["context_length"], r["turn"], r["needle"]) for r in records] == [
        (length, t + 1, t) for length in (500, 700) for t in range(3)]
    assert list(scores["turn_scores"]) == ["1", "2", "3"] and all(v["n"] == 2 for v in scores["turn_scores"].values())
    for turn in ("1", "2", "3"):
        mean = sum(r["score"] for r in records if r["turn"] == int(turn)) / 2
        assert scores["turn_scores"][turn]["score"] == pytest.approx(mean)
    assert all(r["kv_tokens_after_turn"] == 64 for r in records if r["turn"] < 3)

    # Kill the second length's session after its first turn, then rerun the same command into a new folder.
    from kvbench import scheduler

    real = scheduler.generate_session
    calls = []

    def killed(*args, on_turn=None, **kwargs):
        calls.append(kwargs.get("answered"))

        def hook(i, out):
            on_turn(i, out)
            if len(calls) == 2 and i == 0:
                raise KeyboardInterrupt

        return real(*args, on_turn=hook, **kwargs)

    again = compose(overrides + [f"output_dir={tmp_path / 'killed'}"])
    monkeypatch.setattr(scheduler, "generate_session", killed)
    with pytest.raises(KvbenchError, match="interrupted"):
        evaluate(again)
    monkeypatch.setattr(scheduler, "generate_session", real)
    resumed_scores = evaluate(again)
    resumed = read_predictions(Path(tmp_path / "killed") / "predictions" / "needle.jsonl")
    assert [(r["cell"], r["response"], r["answer_ids"]) for r in resumed] == [
        (r["cell"], r["response"], r["answer_ids"]) for r in records]
    assert resumed_scores["turn_scores"] == scores["turn_scores"]
    run = json.loads((Path(tmp_path / "killed") / "run.json").read_text())
    assert run["settings"]["benchmark"]["turn_order"] == [0, 1, 2]


# ---- RULER sessions ----------------------------------------------------------------------------------------------
def ruler_overrides(tmp_path, *extra):
    return ["benchmark=ruler", "model=tiny_llama", "benchmark.lengths=[1024]", "benchmark.samples=1",
            "benchmark.tasks=[niah_multikey_1,niah_multiquery]", f"results_root={tmp_path}", "progress=false",
            "method=snapkv", "budget=64", "benchmark.session=true", *extra]


@pytest.mark.parametrize("template", ["chat", "base"])
def test_ruler_session_asks_each_needle_of_a_sample_in_turn(tmp_path, template):
    from kvbench.models import load_tokenizer
    from kvbench.pipeline import evaluate, prepare
    from kvbench.results import read_predictions
    from kvbench.ruler.data import render
    from kvbench.ruler.session import needles_of, session_ids, session_keys

    cfg = compose(ruler_overrides(tmp_path, f"benchmark.template={template}"))
    job = prepare(cfg)
    tok = load_tokenizer(job.spec)
    plan = job.benchmark
    for task in plan.tasks:
        sample = plan.datasets[(task, 1024)][0]
        context, turns = session_ids(task, sample, tok, plan.template)
        rendered = render(sample, tok, plan.template)
        asked = session_keys(task, sample)
        assert context == rendered.context_ids and len(turns) == 4 and len({k for k, _ in asked}) == 4
        assert set(asked) <= set(needles_of(sample["context"], "numbers"))
        if task == "niah_multikey_1":  # turn 1 is the sample's own prompt
            assert list(turns[0].question_ids) == rendered.question_ids and asked[0][1] == sample["outputs"][0]
        else:  # multi-query: one of its keys per turn, in the question's order
            assert [v for _, v in asked] == sample["outputs"]
        for (key, value), turn in zip(asked, turns):
            assert key in tok.decode(turn.question_ids) and tok.decode(turn.answer_ids).startswith(f" {value}.")
    scores = evaluate(cfg)
    for task in plan.tasks:
        records = read_predictions(output_dir(cfg) / "predictions" / f"{task}.jsonl")
        assert [r["_id"] for r in records] == [f"1024_0_t{t}" for t in range(1, 5)]
        assert [r["outputs"] for r in records] == [[v] for _, v in session_keys(task, plan.datasets[(task, 1024)][0])]
        assert list(scores["turn_scores"][task]) == ["1", "2", "3", "4"]
        assert scores["n"][task] == 4
    assert job.benchmark.settings()["turn_order"].startswith("multiquery")


def test_sessions_are_refused_where_questions_do_not_share_a_context(tmp_path):
    from kvbench.pipeline import prepare

    with pytest.raises(KvbenchError, match="RULER tasks vt ask one question of their context"):
        prepare(compose(ruler_overrides(tmp_path, "benchmark.tasks=[niah_multiquery,vt]")))
    with pytest.raises(KvbenchError, match="longbench_e has no multi-turn sessions"):
        prepare(compose(["benchmark=longbench_e", f"results_root={tmp_path}", "++benchmark.session=true"]))
    with pytest.raises(KvbenchError, match="needs generated RULER samples"):
        prepare(compose(ruler_overrides(tmp_path, f"benchmark.data_dir={tmp_path}")))


# ---- LongBench sessions ------------------------------------------------------------------------------------------
def longbench_data(tmp_path) -> Path:
    """multifieldqa_zh rows of the real file, rearranged: two contexts asked twice and once."""
    rows = [json.loads(line) for line in (Path("/work/shared/data/longbench") / "multifieldqa_zh.jsonl").open()]
    contexts = [r["context"] for r in rows]
    shared = min((c for c in set(contexts) if contexts.count(c) > 1), key=len)
    alone = min((c for c in set(contexts) if contexts.count(c) == 1), key=len)
    picked = [r for r in rows if r["context"] == shared][:2] + [r for r in rows if r["context"] == alone]
    folder = tmp_path / "lb"
    folder.mkdir()
    (folder / "multifieldqa_zh.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in picked))
    return folder


@pytest.mark.parametrize("answers", ["gold", "model"])
def test_longbench_samples_sharing_a_context_are_one_session(tmp_path, answers):
    if not Path("/work/shared/data/longbench/multifieldqa_zh.jsonl").is_file():
        pytest.skip("shared LongBench files not present")
    from kvbench.pipeline import evaluate, prepare
    from kvbench.results import read_predictions

    data = longbench_data(tmp_path)
    overrides = ["model=tiny_llama", f"benchmark.data_dir={data}", "benchmark.tasks=[multifieldqa_zh]",
                 "benchmark.verify_checksums=false", f"results_root={tmp_path}", "progress=false",
                 "benchmark.max_new_tokens=8", "method=fullkv", "benchmark.session=true",
                 f"benchmark.session_answers={answers}"]
    cfg = compose(overrides)
    scores = evaluate(cfg)
    records = read_predictions(output_dir(cfg) / "predictions" / "multifieldqa_zh.jsonl")
    rows = [json.loads(line) for line in (data / "multifieldqa_zh.jsonl").open()]
    assert [(r["_id"], r["turn"], r["session"]) for r in records] == [
        (rows[0]["_id"], 1, rows[0]["_id"]), (rows[1]["_id"], 2, rows[0]["_id"]), (rows[2]["_id"], 1, rows[2]["_id"])]
    assert {k: v["n"] for k, v in scores["turn_scores"]["multifieldqa_zh"].items()} == {"1": 2, "2": 1}
    # FullKV: turn 2 equals one generate over the conversation (context, question 1, answer 1, question 2).
    from kvbench.longbench.session import session_ids

    job = prepare(cfg)
    model, tok = job_model()
    context, turns = session_ids("multifieldqa_zh", rows[:2], tok, job.benchmark.protocol, job.spec.max_input_len)
    first = records[0]["answer_ids"]
    answer = list(turns[0].answer_ids) if answers == "gold" else (
        (first[:-1] if first[-1] in job_stops(tok) else first) + list(turns[0].close_ids))
    conversation = context + list(turns[0].question_ids) + answer + list(turns[1].question_ids)
    ref = generate(model, torch.tensor([conversation]), None, max_new_tokens=8, stop_token_ids=job_stops(tok))
    assert ref.token_ids == records[1]["answer_ids"]


def job_model():
    from conftest import cached_model

    return cached_model("tiny_llama")


def job_stops(tok) -> list[int]:
    from kvbench.longbench.protocol import generation_settings
    from conftest import protocol_preset

    model, _ = job_model()
    return list(generation_settings("multifieldqa_zh", tok, model.generation_config,
                                    protocol_preset("official")).stop_token_ids)


# ---- the benchmark interface: a session is one Sample, written turn by turn by the pipeline ----------------------
class _Talk(Benchmark):
    """Two sessions without a model: session s<k> has 3 turns; a turn's answer is its question's id."""
    name = "talk_test"
    sessions = True

    def select(self):
        return [Sample("talk", f"s{k}", k, turns=3) for k in range(2)]

    def prompts(self, todo, tokenizer, model):
        for sample in todo:
            turns = tuple(Turn((10 * sample.data + i,), (1,), (2,)) for i in range(3))
            yield sample, Prompt([5, 6], 4, turns=turns, session_answers="model")

    def record(self, sample, prompt, out, text):
        raise AssertionError("a session's lines are its turns")

    def record_turn(self, sample, prompt, turn, out, text):
        return {"_id": f"{sample.key}_t{turn + 1}", "session": sample.key, "turn": turn + 1, "pred": text,
                "answer_ids": list(out.token_ids)}

    def summarize(self, store):
        return [(r["_id"], r["pred"]) for r in store.records("talk")]


class _TurnOut:
    def __init__(self, ids):
        self.token_ids = list(ids)


def test_the_pipeline_writes_each_turn_and_resumes_a_session_at_its_first_unanswered_turn(tmp_path):
    from kvbench.pipeline import predict
    from kvbench.results import RunStore

    asked = []

    def engine(kill_at=None):
        def answer(requests, on_turn):  # what _run's answer does: each turn handed back as it ends
            for request in requests:
                asked.append((request.key[0].key, request.turns[0].question_ids, request.answered))
                for i, turn in enumerate(request.turns):
                    if (request.key[0].key, i) == kill_at:
                        raise KeyboardInterrupt
                    on_turn(request, i, _TurnOut(turn.question_ids), str(turn.question_ids[0]))
                yield request, _TurnOut([]), ""
        return answer

    store = RunStore(tmp_path / "run", {"x": 1}, {})
    store.open()
    with pytest.raises(KeyboardInterrupt):
        predict(_Talk(), store, None, None, engine(kill_at=("s1", 2)))
    assert [r["_id"] for r in store.records("talk")] == ["s0_t1", "s0_t2", "s0_t3", "s1_t1", "s1_t2"]
    asked.clear()
    scores = predict(_Talk(), store, None, None, engine())
    assert asked == [("s1", (10,), ((10,), (11,)))]  # only s1, its two recorded answers replayed
    assert scores == [(f"s{k}_t{t + 1}", str(10 * k + t)) for k in range(2) for t in range(3)]
    asked.clear()
    assert predict(_Talk(), store, None, None, engine()) == scores and asked == []


def test_a_session_that_can_reach_past_the_context_is_refused_before_any_turn_is_answered(tmp_path):
    from kvbench.pipeline import predict
    from kvbench.results import RunStore

    asked = []

    def answer(requests, on_turn):
        for request in requests:
            asked.append(request.key[0].key)
            for i, turn in enumerate(request.turns):
                on_turn(request, i, _TurnOut(turn.question_ids), "x")
            yield request, _TurnOut([]), ""

    # each session: a 2-token context, then 3 turns of a 1-token question + up to 4 generated + a 1-token close
    assert Request([5, 6], 4, turns=(Turn((1,), (1,), (2,)),) * 3, session_answers="model").positions() == 20
    assert Request([5, 6], 4, turns=(Turn((1,), (1,), (2,)),) * 3).positions() == 2 + 3 * (1 + 4)  # gold: 1 < 4
    store = RunStore(tmp_path / "run", {"x": 1}, {})
    store.open()
    with pytest.raises(KvbenchError, match=r"2 of 2 sessions can reach past tiny's context of 19 tokens \(the "
                                           r"longest up to 20.*model.trained_len="):
        predict(_Talk(), store, None, None, answer, context=19, model_name="tiny")
    assert asked == [] and store.records("talk") == []
    predict(_Talk(), store, None, None, answer, context=20, model_name="tiny")
    assert asked == ["s0", "s1"]
