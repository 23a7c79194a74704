"""RULER: generation (deterministic, RULER's templates and sizing), the context | question split, kvpress-format
files, RULER's metrics, and the plan/run/scores on a fake engine (no model)."""
from __future__ import annotations

import hashlib
import json
import re

import pytest
from omegaconf import OmegaConf

from kvbench.config import compose
from kvbench.engine import GenerationOutput
from kvbench.errors import KvbenchError
from kvbench.models import ModelSpec, load_tokenizer
from kvbench.pipeline import predict
from kvbench.results import RunStore
from kvbench.ruler import constants as C
from kvbench.ruler.data import read_kvpress, render, set_sha256
from kvbench.ruler.generate import Context, PairWords, generate_task
from kvbench.ruler.metrics import (match_all, match_part, postprocess, sample_score, string_match_all,
                                   string_match_part, task_score)
from kvbench.ruler.runner import plan_ruler
from kvbench.ruler.template import ModelTemplate, model_template

# sha256 of RULER's strings, computed from NVIDIA/RULER c3f5e3b scripts/data/synthetic/constants.py itself.
RULER_SHA256 = {
    ("niah", "template"): "b373c00e238df12bea974d3fdc4ffebcc0f04600885640250040e3c27169216f",
    ("niah", "answer_prefix"): "994f3a46e763414f630c39b097b66c4df6160ef1c5991817cfabee7bfee4ec19",
    ("variable_tracking", "template"): "fcfaf2eab2bc3e35a119b13fe42e5902800291c4d6101c60be93ecf8b031fefa",
    ("variable_tracking", "answer_prefix"): "4a4e9010ec4141a3706929569612af94bd4098ee660862395a73b0100e52c5a6",
    ("common_words_extraction", "template"): "45fff5d17627b65ac12c8bf0e60380cbb05966878794a18ec394c2df9bea19b1",
    ("common_words_extraction", "answer_prefix"): "8ee526599bbc73726f19bb07da106d143a194667cf52e08434c44ce652e08028",
    ("freq_words_extraction", "template"): "a0c7b873cf500d6ce65950a91baecd810ce34d151939da916a43fa5014178f9c",
    ("freq_words_extraction", "answer_prefix"): "9a72271c5762c96d9adbf480f21e621c5855e48cc029605c1c422135c4db7a92",
    ("qa", "template"): "18a659c9723f24f172004ab1692ae88efaf0c07417b6d7326f813c7169011d28",
    ("qa", "answer_prefix"): "255204f061d7e266f2aa1e50df08977c15a9c31b4cd8f3fbef0f96da93d564aa",
}
RULER_TOKENS = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120, "freq_words_extraction": 50,
                "qa": 32}
NOISE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt")


@pytest.fixture(scope="module")
def tok():
    cfg = compose(["model=smollm2_135m"])
    return load_tokenizer(ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True)))


def count(tokenizer):
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def gen(tokenizer, task, length=1024, n=3, seed=42, template=None):
    return generate_task(Context(task, seed, length, count(tokenizer), template or ModelTemplate("base")), n)


@pytest.fixture(scope="module")
def base_sets(tok):
    return {task: gen(tok, task) for task in C.SYNTHETIC_TASKS}


# ------------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("family,field", sorted(RULER_SHA256))
def test_templates_are_rulers_text(family, field):
    assert hashlib.sha256(C.FAMILIES[family][field].encode()).hexdigest() == RULER_SHA256[(family, field)]


def test_tokens_to_generate_and_metrics_are_rulers():
    assert {f: v["tokens_to_generate"] for f, v in C.FAMILIES.items()} == RULER_TOKENS
    assert C.METRIC == {"niah": "string_match_all", "variable_tracking": "string_match_all",
                        "common_words_extraction": "string_match_all", "freq_words_extraction": "string_match_all",
                        "qa": "string_match_part"}
    assert list(C.TASKS) == ["niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2"]


def test_singular_niah_prompt_is_rulers(base_sets):
    s = base_sets["niah_single_1"][0]
    key = re.search(r"for (\S+) mentioned", s["question"]).group(1)
    assert s["context"].startswith("A special magic number is hidden within the following text. Make sure to memorize "
                                   "it. I will quiz you about the number afterwards.\n")
    assert s["context"].endswith("\n")
    assert s["question"] == f"What is the special magic number for {key} mentioned in the provided text?"
    assert s["answer_prefix"] == f" The special magic number for {key} mentioned in the provided text is"
    assert f"One of the special magic numbers for {key} is: {s['outputs'][0]}." in s["context"]


def test_plural_niah_prompt_keeps_rulers_plural(base_sets):
    s = base_sets["niah_multiquery"][0]
    assert s["context"].startswith("Some special magic numbers are hidden within the following text.")
    assert s["question"].startswith("What are all the special magic numbers for ") and ", and " in s["question"]
    assert len(s["outputs"]) == 4 and s["answer_prefix"].endswith("mentioned in the provided text are")
    assert len(base_sets["niah_multivalue"][0]["outputs"]) == 4


def test_value_types(base_sets):
    assert all(re.fullmatch(r"\d{7}", o) for o in base_sets["niah_single_1"][0]["outputs"])
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    assert re.fullmatch(uuid, base_sets["niah_single_3"][0]["outputs"][0])
    assert re.search(rf"for {uuid} is: {uuid}\.", base_sets["niah_multikey_3"][0]["context"])
    vt = base_sets["vt"][0]
    assert len(vt["outputs"]) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in vt["outputs"])
    assert re.search(r"\nVAR [A-Z]{3} = \d{5}\n", vt["context"])  # the one-shot example, 3-letter names
    assert len(base_sets["cwe"][0]["outputs"]) == 10 and len(base_sets["fwe"][0]["outputs"]) == 3
    assert "..." not in base_sets["fwe"][0]["outputs"]


# ----------------------------------------------------------------------------------------- generation
def test_generation_is_deterministic_and_prefix_stable(tok, base_sets):
    for task in ("niah_single_2", "niah_multikey_2", "vt", "cwe", "fwe"):
        again = gen(tok, task)
        assert again == base_sets[task]
        assert gen(tok, task, n=2) == base_sets[task][:2]  # the first k of n samples are the k-sample set
    assert gen(tok, "niah_single_1", seed=7) != base_sets["niah_single_1"]


def test_every_answer_occurs_in_its_context(base_sets):
    for task, samples in base_sets.items():
        for s in samples:
            for answer in s["outputs"]:
                assert answer in s["context"], (task, s["index"], answer)


def test_split_rebuilds_rulers_prompt(base_sets):
    for task, samples in base_sets.items():
        pattern = C.QUESTION_PATTERNS[C.family_of(task)]
        for s in samples:
            assert re.match(pattern, s["question"]) and not re.search(pattern, s["question"][1:]), task
            assert s["answer_prefix"].startswith(C.FAMILIES[C.family_of(task)]["answer_prefix"][:10])
    cwe = base_sets["cwe"][0]["context"]
    assert cwe.count("Question: What are the 10 most common words in the above list?") == 1  # the few-shot's


def test_sizing_within_rulers_tolerance(tok, base_sets):
    n = count(tok)
    for task, samples in base_sets.items():
        for s in samples:
            full = s["context"] + s["question"] + s["answer_prefix"]
            assert s["ruler_tokens"] == n(full) + s["max_new_tokens"] <= 1024, task
    # noise / needle haystacks grow by 5 lines below 4096: a sample is at most a few lines short of the target
    for task in NOISE_TASKS:
        assert all(1024 - s["ruler_tokens"] < 150 for s in base_sets[task]), task
    # fwe sizes the word count once (linear steps of max_len // 32 words), then every sample draws a new coded
    # vocabulary whose Zipf-heavy top words tokenise longer or shorter: RULER's spread is wider there
    assert all(1024 - s["ruler_tokens"] < 1024 // 4 for s in base_sets["fwe"])


def test_chat_template_wraps_and_splits(tok):
    template = model_template(tok, "chat")
    assert template.prefix and template.suffix
    s = gen(tok, "niah_single_1", n=1, template=template)[0]
    assert s["context"].startswith(template.prefix)
    assert s["question"].endswith(template.suffix)
    assert s["answer_prefix"].startswith(" The special magic number for ")
    assert "You are" in template.prefix and "You are" in s["context"]  # the singular rewrite spares the template
    rendered = render(s, tok, template)  # context + question ids == the one-prompt tokenisation
    assert rendered.input_ids == list(tok.encode(s["context"] + s["question"] + s["answer_prefix"],
                                                 add_special_tokens=False))
    assert tok.decode(rendered.context_ids) == s["context"]


def test_pair_words_equal_rulers_sorted_set():
    from kvbench.ruler.resources import word_list
    adjs, nouns = list(word_list("adjectivelist.txt")), list(word_list("nounlist.txt"))[::20]
    heads = sorted(a + "-" for a in adjs)
    family = [a for a in adjs if any(b != a and b.startswith(a + "-") for b in adjs)]
    pick = sorted(set(adjs[::40] + family + [b for b in adjs for a in family if b.startswith(a + "-")]))
    assert heads and family  # wonderwords has adjectives whose "adj-" prefixes another's
    expected = sorted({f"{a}-{n}" for a in pick for n in nouns})
    words = PairWords(pick, nouns)
    assert len(words) == len(expected) and [words[i] for i in range(len(words))] == expected


# -------------------------------------------------------------------------------------------- metrics
def test_metrics_equal_rulers_on_edge_cases():
    refs = [["ABC", "def"], ["1234567"], ["x", "y", "z"], ["foo"]]
    preds = ["the abc and DEF", "no number here", "x and z", ""]
    assert string_match_all(preds, refs) == round((1 + 0 + 2 / 3 + 0) / 4 * 100, 2) == 41.67
    assert string_match_part(preds, refs) == 50.0
    assert match_all("", ["a"]) == 0.0 and match_part("", ["a", "b"]) == 0.0
    assert match_all("1234567", ["123456"]) == 1.0  # substring match, as RULER (no word boundaries)
    assert postprocess("  \x01a\tb\n ") == "a\nb"
    assert sample_score("qa_1", "Paris!", ["paris", "Lyon"]) == 1.0
    assert sample_score("niah_multivalue", " 1 and 3", ["1", "2", "3", "4"]) == 0.5
    assert task_score([1.0, 0.0, 0.5]) == 50.0 and task_score([]) is None


# ------------------------------------------------------------------------------------------- kvpress
def _kvpress_rows():
    return [{"context": "Some text. One of the special magic numbers for a-b is: 1234567.\n",
             "question": "What is the special magic number for a-b mentioned in the provided text? ",
             "answer_prefix": "The special magic number for a-b mentioned in the provided text is",
             "answer": ["1234567"], "task": "niah_single_1", "max_new_tokens": 128},
            {"context": "1. x 2. y\n", "question": "Question: What are the 10 most common words in the above list? ",
             "answer_prefix": "Answer: The top 10 words that appear most often in the list are:",
             "answer": ["x"], "task": "cwe", "max_new_tokens": 120}]


def test_kvpress_reader_jsonl_and_parquet(tmp_path, tok):
    import pandas as pd
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _kvpress_rows()))
    (tmp_path / "b").mkdir()
    pd.DataFrame(_kvpress_rows()).to_parquet(tmp_path / "b" / "test.parquet")
    by_json, sha_json = read_kvpress(tmp_path / "a", 4096)
    by_parquet, _ = read_kvpress(tmp_path / "b", 4096)
    assert by_json == by_parquet and sorted(by_json) == ["cwe", "niah_single_1"]
    s = by_json["niah_single_1"][0]
    assert s["outputs"] == ["1234567"] and s["max_new_tokens"] == 128 and len(sha_json) == 64
    chat = model_template(tok, "chat")
    r = render(s, tok, chat)  # kvpress's pipeline: prefix + context | question + suffix + answer prefix
    assert tok.decode(r.context_ids) == chat.prefix + s["context"]
    assert tok.decode(r.question_ids) == s["question"] + chat.suffix + s["answer_prefix"]
    base = render(s, tok, ModelTemplate("base"))
    assert tok.decode(base.question_ids) == s["question"] + "\n" + s["answer_prefix"]


def test_kvpress_reader_errors(tmp_path):
    rows = _kvpress_rows()
    del rows[0]["answer_prefix"]
    (tmp_path / "x.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(KvbenchError, match="missing column"):
        read_kvpress(tmp_path, 4096)
    (tmp_path / "x.jsonl").write_text(json.dumps({**_kvpress_rows()[0], "task": "nope"}) + "\n")
    with pytest.raises(KvbenchError, match="not a RULER task"):
        read_kvpress(tmp_path, 4096)


# ----------------------------------------------------------------------------------- plan, run, scores
def _cfg(tmp_path, *extra):
    return compose(["benchmark=ruler", "model=tiny_llama", "benchmark.lengths=[1024]", "benchmark.samples=2",
                    "benchmark.tasks=[niah_single_1,vt]", f"results_root={tmp_path}", *extra])


def _spec(cfg):
    return ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True))


def test_plan_caches_and_records_sha(tmp_path):
    cfg = _cfg(tmp_path)
    plan = plan_ruler(cfg, _spec(cfg))
    files = sorted((tmp_path / ".cache" / "ruler").glob("*.jsonl"))
    assert len(files) == 2
    assert plan.settings()["source"]["kind"] == "generated" and plan.settings()["query"] == "aware"
    again = plan_ruler(cfg, _spec(cfg))  # from the cache
    assert again.datasets == plan.datasets and again.data_sha256() == plan.data_sha256()
    assert plan.data_sha256()["vt@1024"] == set_sha256(plan.datasets[("vt", 1024)])


@pytest.mark.parametrize("override,message", [
    ("benchmark.lengths=[4096]", "exceed tiny_llama's context"),
    ("benchmark.tasks=[niah_single_9]", "unknown RULER task"),
    ("benchmark.query=sometimes", "benchmark.query"),
    ("benchmark.samples=0", "positive integer"),
    ("benchmark.template=fancy", "benchmark.template"),
    ("benchmark.data_dir=/nonexistent", "not a folder"),
])
def test_plan_errors_before_any_model(tmp_path, override, message):
    cfg = _cfg(tmp_path, override)
    with pytest.raises(KvbenchError, match=message):
        plan_ruler(cfg, _spec(cfg))


def test_qa_without_data_is_skipped_with_a_note(tmp_path):
    cfg = _cfg(tmp_path, "benchmark.tasks=[niah_single_1,qa_1]")
    plan = plan_ruler(cfg, _spec(cfg))
    assert plan.tasks == ["niah_single_1"] and "benchmark.qa_dir" in plan.skipped["qa_1"]


class _Model:
    generation_config = type("G", (), {"eos_token_id": [2]})()


def _fake_engine(answers, calls):
    def answer(requests):  # the pipeline's engine side: (request, output, text) per request
        for request in requests:
            input_ids = request.input_ids
            kwargs = {} if request.question_ids is None else {"question_ids": request.question_ids}
            calls.append((len(input_ids), request.max_new_tokens, kwargs))
            out = GenerationOutput([], len(input_ids), 0.0, 0.0, 0, [len(input_ids)], "max_new_tokens")
            yield request, out, answers(len(calls))
    return answer


def test_run_scores_resumes_and_query_modes(tmp_path, tok):
    cfg = _cfg(tmp_path)
    plan = plan_ruler(cfg, _spec(cfg))
    store = RunStore(tmp_path / "run", plan.settings(), {})
    store.open()
    truth = [s["outputs"] for t in plan.tasks for s in plan.datasets[(t, 1024)]]
    calls = []
    # first niah sample right, second wrong; vt: first right, second 2 of 5
    preds = {1: " " + truth[0][0].upper(), 2: "", 3: " ".join(truth[2]), 4: " ".join(truth[3][:2])}
    scores = predict(plan, store, _Model(), tok, _fake_engine(lambda i: preds[i], calls))
    assert [c[1] for c in calls] == [128, 128, 30, 30]
    assert scores["lengths"]["1024"]["tasks"] == {"niah_single_1": 50.0, "vt": 70.0}
    vt = [(r["id"], r["score"]) for r in scores["sample_scores"] if r["task"] == "vt"]
    assert vt == [("1024_0", 1.0), ("1024_1", 0.4)] and scores["avg"] == 60.0
    assert scores["avg_label"] == "2-task average" and set(scores["data_sha256"]) == {"niah_single_1@1024", "vt@1024"}
    assert predict(plan, store, _Model(), tok, _fake_engine(lambda i: "", calls)) == scores and len(calls) == 4

    agnostic = plan_ruler(*(lambda c: (c, _spec(c)))(_cfg(tmp_path, "benchmark.query=agnostic")))
    store2 = RunStore(tmp_path / "run2", agnostic.settings(), {})
    store2.open()
    calls.clear()
    predict(agnostic, store2, _Model(), tok, _fake_engine(lambda i: "", calls))
    sample = agnostic.datasets[("niah_single_1", 1024)][0]
    rendered = render(sample, tok, agnostic.template)
    assert calls[0][0] == len(rendered.context_ids) and calls[0][2] == {"question_ids": rendered.question_ids}
    assert agnostic.settings() != plan.settings() and agnostic.protocol_name().endswith("_agnostic")


# ----------------------------------------------------------------------------------------------- qa, e2e
def _write_qa(folder):
    folder.mkdir()
    paragraphs = [{"context": f"Paragraph {i} says the capital of land {i} is city{i}.",
                   "qas": [{"question": f"What is the capital of land {i}?", "is_impossible": False,
                            "answers": [{"text": f"city{i}"}, {"text": f"City{i}"}]},
                           {"question": "Unanswerable?", "is_impossible": True, "answers": []}]}
                  for i in range(40)]
    squad = {"data": [{"paragraphs": paragraphs[:20]}, {"paragraphs": paragraphs[20:]}]}
    (folder / "squad.json").write_text(json.dumps(squad))
    hotpot = [{"question": f"Which film did director {i} make?", "answer": f"film{i}",
               "context": [[f"Title {i}-{j}", [f"Director {i} made film{i}. ", f"Note {j}."]] for j in range(10)]}
              for i in range(10)]
    (folder / "hotpotqa.json").write_text(json.dumps(hotpot))


def test_qa_tasks_from_a_local_folder(tmp_path, tok):
    _write_qa(tmp_path / "qa")
    for task, answer in (("qa_1", "city0"), ("qa_2", "film0")):
        ctx = Context(task, 42, 1024, count(tok), ModelTemplate("base"), qa_dir=str(tmp_path / "qa"))
        samples = generate_task(ctx, 2)
        first = samples[0]
        assert answer in first["outputs"] and answer in first["context"]
        assert first["question"].startswith("Answer the question based on the given documents.")
        assert first["context"].count("Answer the question based on the given documents.") == 1
        assert first["answer_prefix"] == " Answer:" and "Document 1:\n" in first["context"]
        assert all(s["ruler_tokens"] <= 1024 for s in samples)
    assert sample_score("qa_1", "It is CITY0.", ["city0", "City0"]) == 1.0


def test_too_long_kvpress_sample_fails_at_start(tmp_path):
    folder = tmp_path / "data" / "1024"
    folder.mkdir(parents=True)
    row = {**_kvpress_rows()[0], "context": "word " * 3000}
    (folder / "test.jsonl").write_text(json.dumps(row) + "\n")
    cfg = _cfg(tmp_path, f"benchmark.data_dir={tmp_path / 'data'}", "benchmark.tasks=[niah_single_1]")
    with pytest.raises(KvbenchError, match="more than tiny_llama's 2048"):
        plan_ruler(cfg, _spec(cfg))


def test_pipeline_runs_ruler_end_to_end(tmp_path):
    import torch

    from kvbench.pipeline import evaluate
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "benchmark.samples=1", "benchmark.tasks=[vt]", "method=snapkv", "budget=64",
               "progress=false")
    scores = evaluate(cfg)
    assert scores["benchmark"] == "ruler" and scores["n"] == {"vt": 1}
    run = json.loads(next(tmp_path.rglob("run.json")).read_text())
    assert run["settings"]["benchmark"]["source"]["kind"] == "generated" and run["protocol"] == "ruler_chat"
    line = json.loads(next(tmp_path.rglob("vt.jsonl")).read_text().splitlines()[0])
    assert line["_id"] == "1024_0" and line["new_tokens"] <= 30 and line["score"] in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
