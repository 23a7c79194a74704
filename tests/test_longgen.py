"""Long-output benchmark (copy_list): deterministic generation from the seed, the exact line scorer, the plan's
errors before any model, run/resume/query modes on a fake engine, and a tiny-model run through run.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from kvbench.config import compose
from kvbench.engine import GenerationOutput
from kvbench.errors import KvbenchError
from kvbench.longgen.generate import Generator, max_new_tokens
from kvbench.longgen.metrics import line_scores, normalize_lines
from kvbench.longgen.runner import plan_longgen
from kvbench.models import ModelSpec, load_tokenizer
from kvbench.pipeline import predict
from kvbench.results import RunStore
from kvbench.ruler.data import render, set_sha256
from kvbench.ruler.template import ModelTemplate, model_template

from conftest import REPO


@pytest.fixture(scope="module")
def tok():
    cfg = compose(["model=smollm2_135m"])
    return load_tokenizer(ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True)))


def _cfg(tmp_path, *extra):
    return compose(["benchmark=longgen", "model=tiny_llama", "benchmark.lengths=[700]", "benchmark.samples=2",
                    f"results_root={tmp_path}", *extra])


def _spec(cfg):
    return ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True))


# ------------------------------------------------------------------------------------------------ generation
def test_same_seed_same_samples_other_seed_other_samples(tok):
    template = model_template(tok, "chat")
    a = [Generator(tok, template, 7).sample("copy_list", 800, 256, i) for i in range(3)]
    b = [Generator(tok, template, 7).sample("copy_list", 800, 256, i) for i in range(3)]
    c = [Generator(tok, template, 8).sample("copy_list", 800, 256, i) for i in range(3)]
    assert set_sha256(a) == set_sha256(b) and a == b
    assert set_sha256(a) != set_sha256(c)
    assert len({tuple(s["outputs"]) for s in a}) == 3  # samples differ from one another


def test_sample_holds_its_list_is_long_enough_and_fits(tok):
    template = model_template(tok, "chat")
    gen = Generator(tok, template, 42)
    for i in range(3):
        s = gen.sample("copy_list", 900, 300, i)
        block = "\n".join(s["outputs"])
        assert block in s["context"] and s["context"].startswith(template.prefix)
        assert s["question"].endswith(template.suffix) and s["answer_prefix"] == "The numbered list:\n1."
        assert [line.split(". ", 1)[0] for line in s["outputs"]] == [str(k) for k in range(1, s["items"] + 1)]
        assert len({line.split(". ", 1)[1] for line in s["outputs"]}) == s["items"]  # distinct items
        assert s["answer_tokens"] == len(tok.encode(block, add_special_tokens=False)) >= 300
        assert s["max_new_tokens"] == max_new_tokens(s["answer_tokens"]) > s["answer_tokens"]
        rendered = render(s, tok, template)
        assert len(rendered.input_ids) == s["prompt_tokens"] <= 900 and s["prompt_tokens"] > 700
        question = tok.decode(rendered.question_ids)
        assert question.strip().startswith("Now copy the numbered list") and question.endswith("list:\n1.")


def test_fillers(tok):
    template = model_template(tok, "chat")
    noise = Generator(tok, template, 42, "noise").sample("copy_list", 900, 256, 0)
    essay = Generator(tok, template, 42, "essay").sample("copy_list", 900, 256, 0)
    assert noise["outputs"] == essay["outputs"]  # same list, other filler
    assert "The grass is green." in noise["context"] and "The grass is green." not in essay["context"]
    for line in essay["outputs"]:
        assert essay["context"].count(line.split(". ", 1)[1]) == 1  # a list sentence is not repeated in the filler
    assert Generator(tok, template, 42, "noise").identity() != Generator(tok, template, 42, "essay").identity()


def test_too_short_length_is_refused(tok):
    with pytest.raises(KvbenchError, match="cannot hold a list of 256 tokens"):
        Generator(tok, ModelTemplate("base"), 42).sample("copy_list", 200, 256, 0)


# --------------------------------------------------------------------------------------------------- scorer
REF = ["1. The cat sat.", "2. A dog ran.", "3. Birds fly south.", "4. Fish swim."]


@pytest.mark.parametrize("pred,score,exact,prefix", [
    ("1. The cat sat.\n2. A dog ran.\n3. Birds fly south.\n4. Fish swim.", 1.0, 1.0, 1.0),
    ("  1) The cat  sat.\n\n2.A dog ran.\n3. Birds fly south.\n4. Fish swim.\n", 1.0, 1.0, 1.0),  # format only
    ("The cat sat.\nA dog ran.\nBirds fly south.\nFish swim.", 1.0, 1.0, 1.0),  # numbers left out
    ("1. The cat sat.\n2. Birds fly south.\n3. Fish swim.", 0.75, 0.0, 0.25),  # one line skipped
    ("1. The cat sat.\n2. A dog ran.\n3. Birds fly north.\n4. Fish swim.", 0.75, 0.0, 0.5),  # one line changed
    ("Here is the list:\n1. The cat sat.\n2. A dog ran.\n3. Birds fly south.\n4. Fish swim.", 1.0, 0.0, 0.0),
    ("1. the cat sat.\n2. A dog ran", 0.0, 0.0, 0.0),  # case and punctuation count
    ("4. Fish swim.\n3. Birds fly south.\n2. A dog ran.\n1. The cat sat.", 0.25, 0.0, 0.0),  # reversed
    ("1. The cat sat.\n1. The cat sat.\n1. The cat sat.\n1. The cat sat.", 0.25, 0.0, 0.25),  # repeats
    ("", 0.0, 0.0, 0.0),
])
def test_line_scores(pred, score, exact, prefix):
    assert line_scores(pred, REF) == {"score": score, "exact": exact, "prefix": prefix}


def test_normalize_keeps_inner_numbers():
    assert normalize_lines("12. In 1998 we had 3 users.\n 7)  ok ") == ["In 1998 we had 3 users.", "ok"]


# ------------------------------------------------------------------------------------------- plan, run, resume
@pytest.mark.parametrize("override,message", [
    ("benchmark.lengths=[4096]", "exceed tiny_llama's context"),
    ("benchmark.lengths=[abc]", "list of integers"),
    ("benchmark.tasks=[copy_lists]", "unknown long-output task"),
    ("benchmark.samples=0", "positive integer"),
    ("benchmark.output_tokens=100", "at least 256"),
    ("benchmark.output_tokens=2.5", "positive integer"),
    ("benchmark.query=sometimes", "benchmark.query"),
    ("benchmark.template=fancy", "benchmark.template"),
    ("benchmark.filler=lorem", "benchmark.filler='lorem': choose one of noise, essay"),
    ("benchmark.samples=many", "positive integer"),
    ("benchmark.lengths=[300]", "cannot hold a list"),
    ("benchmark.lengths=[2000]", "more than tiny_llama's 2048"),
])
def test_plan_errors_before_any_model(tmp_path, override, message):
    cfg = _cfg(tmp_path, override)
    with pytest.raises(KvbenchError, match=message):
        plan_longgen(cfg, _spec(cfg))


def test_plan_caches_and_records_sha(tmp_path):
    cfg = _cfg(tmp_path)
    plan = plan_longgen(cfg, _spec(cfg))
    files = list((tmp_path / ".cache" / "longgen").glob("copy_list_700_256_*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 2
    more = plan_longgen(*(lambda c: (c, _spec(c)))(_cfg(tmp_path, "benchmark.samples=3")))  # extends the cache
    assert more.datasets[("copy_list", 700)][:2] == plan.datasets[("copy_list", 700)]
    assert len(files[0].read_text().splitlines()) == 3
    assert plan.data_sha256()["copy_list@700"] == set_sha256(plan.datasets[("copy_list", 700)])
    assert plan.settings()["output_tokens"] == 256 and plan.settings()["source"]["seed"] == 42
    other = plan_longgen(*(lambda c: (c, _spec(c)))(_cfg(tmp_path, "seed=1")))
    assert other.settings() != plan.settings() and other.data_sha256() != plan.data_sha256()


class _Model:
    generation_config = type("G", (), {"eos_token_id": [2]})()


def _fake_engine(answers, calls):
    def answer(requests):  # the pipeline's engine side: (request, output, text) per request
        for request in requests:
            input_ids = request.input_ids
            kwargs = {} if request.question_ids is None else {"question_ids": request.question_ids}
            calls.append((len(input_ids), request.max_new_tokens, kwargs))
            text = answers(len(calls))
            out = GenerationOutput(list(range(len(text) // 4)), len(input_ids), 0.0, 0.0, 0, [len(input_ids)], "eos")
            yield request, out, text
    return answer


def test_run_scores_resumes_and_query_modes(tmp_path, tok):
    cfg = _cfg(tmp_path)
    plan = plan_longgen(cfg, _spec(cfg))
    store = RunStore(tmp_path / "run", plan.settings(), {})
    store.open()
    samples = plan.datasets[("copy_list", 700)]
    # first sample copied exactly, second with its first line left out
    preds = {1: "\n".join(samples[0]["outputs"]), 2: "\n".join(samples[1]["outputs"][1:])}
    calls = []
    scores = predict(plan, store, _Model(), tok, _fake_engine(lambda i: preds[i], calls))
    assert [c[1] for c in calls] == [s["max_new_tokens"] for s in samples]
    second = 1 - 1 / samples[1]["items"]
    assert scores["tasks"]["copy_list"] == round((1 + second) / 2 * 100, 2) and scores["n"] == {"copy_list": 2}
    assert [(r["id"], r["score"]) for r in scores["sample_scores"]] == [("700_0", 1.0), ("700_1", round(second, 6))]
    assert scores["lengths"]["700"]["details"]["copy_list"]["exact"] == 50.0
    lines = [json.loads(x) for x in store.prediction_file("copy_list").read_text().splitlines()]
    assert [x["new_tokens"] for x in lines] == [len(preds[1]) // 4, len(preds[2]) // 4]
    assert scores["new_tokens_mean"]["copy_list"] == (len(preds[1]) // 4 + len(preds[2]) // 4) / 2
    assert lines[0]["answer_tokens"] == samples[0]["answer_tokens"] and lines[1]["prefix"] == 0.0
    # resume: nothing is generated again, the scores are the same
    assert predict(plan, store, _Model(), tok, _fake_engine(lambda i: "", calls)) == scores and len(calls) == 2

    agnostic = plan_longgen(*(lambda c: (c, _spec(c)))(_cfg(tmp_path, "benchmark.query=agnostic")))
    store2 = RunStore(tmp_path / "run2", agnostic.settings(), {})
    store2.open()
    calls.clear()
    predict(agnostic, store2, _Model(), tok, _fake_engine(lambda i: "", calls))
    rendered = render(agnostic.datasets[("copy_list", 700)][0], tok, agnostic.template)
    assert calls[0][0] == len(rendered.context_ids) and calls[0][2] == {"question_ids": rendered.question_ids}
    assert agnostic.protocol_name() == "longgen_chat_agnostic" and agnostic.settings() != plan.settings()


def test_changed_data_is_refused_on_resume(tmp_path, tok):
    cfg = _cfg(tmp_path, "benchmark.samples=1")
    plan = plan_longgen(cfg, _spec(cfg))
    store = RunStore(tmp_path / "run", plan.settings(), {})
    store.open()
    predict(plan, store, _Model(), tok, _fake_engine(lambda i: "x", []))
    plan.datasets[("copy_list", 700)][0]["outputs"][0] += " changed"
    with pytest.raises(KvbenchError, match="predicted on other data"):
        predict(plan, store, _Model(), tok, _fake_engine(lambda i: "x", []))


# ----------------------------------------------------------------------------------------------- run.py e2e
@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_run_py_end_to_end_and_resume(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = [sys.executable, str(REPO / "run.py"), "benchmark=longgen", "model=tiny_llama", "method=snapkv",
            "budget=64", "benchmark.lengths=[600]", "benchmark.samples=1", "progress=false", "device=cpu",
            f"results_root={tmp_path}"]
    first = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "tokens generated on average" in first.stdout  # the closing summary shows the generated length
    run_dir = tmp_path / "tiny_llama" / "longgen"
    run = json.loads(next(run_dir.rglob("run.json")).read_text())
    assert run["protocol"] == "longgen_chat" and run["settings"]["benchmark"]["output_tokens"] == 256
    pred_file = next(run_dir.rglob("copy_list.jsonl"))
    line = json.loads(pred_file.read_text())
    assert line["_id"] == "600_0" and 0 < line["new_tokens"] <= line["answer_tokens"] * 1.1 + 16
    assert line["answer_tokens"] >= 256 and 0.0 <= line["score"] <= 1.0 and line["budget_tokens"] == 64
    scores = json.loads(next(run_dir.rglob("scores.json")).read_text())
    assert scores["benchmark"] == "longgen" and scores["n"] == {"copy_list": 1}
    assert scores["tasks"]["copy_list"] == round(line["score"] * 100, 2)
    rows = [json.loads(x) for x in next(run_dir.rglob("sample_scores.jsonl")).read_text().splitlines()]
    assert rows == [{"task": "copy_list", "id": "600_0", "score": line["score"], "context_length": 600,
                     "new_tokens": line["new_tokens"], "answer_tokens": line["answer_tokens"]}]
    second = subprocess.run(args + ["benchmark.samples=2"], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    lines = [json.loads(x) for x in pred_file.read_text().splitlines()]
    assert [x["_id"] for x in lines] == ["600_0", "600_1"] and lines[0] == line  # resumed, first kept


def test_run_py_bad_setting_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(REPO / "run.py"), "benchmark=longgen", "model=tiny_llama",
                           "benchmark.output_tokens=64", f"results_root={tmp_path}"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in said
    assert "benchmark.output_tokens=64: a long-output task" in said and not (tmp_path / "tiny_llama").exists()


def test_sweep_plans_longgen_jobs_with_their_cost(tmp_path):
    from kvbench.sweep import CostModel, plan

    cost = CostModel(seconds_per_ktoken=1.0, seconds_per_token=0.5)
    _, [job] = plan(["model=tiny_llama", "benchmark=longgen", "benchmark.lengths=[600,800]", "benchmark.samples=3",
                     "method=snapkv", f"results_root={tmp_path}"], cost)
    assert (job.status, job.samples_total, job.samples_left) == ("todo", 6, 6)
    assert job.seconds_left == pytest.approx(3 * (600 + 800) / 1000 + 6 * max_new_tokens(296) * 0.5)


def _fake_run(folder, method, budget, rows, query="aware", decode=None):
    folder.mkdir(parents=True)
    full = method == "fullkv"
    run = {"benchmark": "longgen", "model": {"name": "m"}, "method": {"name": method, "decode_interval": decode},
           "config": {"budget": budget, "method": {"budget_agnostic": full}},
           "settings": {"model": {"name": "m"}, "method": {"name": method}, "seed": 42,
                        "benchmark": {"name": "longgen", "query": query, "output_tokens": 256}}}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "sample_scores.jsonl").write_text("".join(
        json.dumps({"task": "copy_list", "id": f"700_{i}", "score": s, "context_length": 700, "new_tokens": n,
                    "answer_tokens": 260}) + "\n" for i, (s, n) in enumerate(rows)))


def test_report_compares_generated_length_with_fullkv(tmp_path):
    from kvbench.report.generated_length import longgen_frame, write_longgen_report

    _fake_run(tmp_path / "full", "fullkv", 128, [(1.0, 300), (0.5, 280), (1.0, 290)])
    _fake_run(tmp_path / "snap", "snapkv", 128, [(0.5, 330), (0.0, 280)])  # 2 of the 3 samples
    _fake_run(tmp_path / "agn", "snapkv", 128, [(0.5, 100)], query="agnostic")  # no FullKV with its settings
    _fake_run(tmp_path / "dec", "snapkv", 128, [(0.0, 310)], decode=16)  # decoding-time compression: its own row
    frame = longgen_frame(tmp_path)
    full, snap, agn = (frame[frame["run_dir"].str.endswith(name)].iloc[0] for name in ("full", "snap", "agn"))
    assert full["score"] == pytest.approx(250 / 3) and full["new_tokens_vs_fullkv"] == 1.0 and full["n"] == 3
    assert snap["score"] == 25.0 and snap["new_tokens"] == 305.0
    assert snap["new_tokens_vs_fullkv"] == pytest.approx((330 + 280) / (300 + 280))  # the samples both ran
    assert math.isnan(agn["new_tokens_vs_fullkv"]) and math.isnan(agn["ci_low"])  # one sample: no CI
    assert full["ci_low"] <= full["score"] <= full["ci_high"]
    written = write_longgen_report(tmp_path, tmp_path / "out")
    text = (tmp_path / "out" / "longgen.md").read_text()
    assert len(written) == 2 and "| m | aware | copy_list | 700 | SnapKV | 128 | prefill | 25.00 |" in text
    assert "| 1.05 |" in text and "| m | aware | copy_list | 700 | SnapKV | 128 | every 16 | 0.00 |" in text
