"""The LongBench metrics and task scoring must give the official numbers to the last digit."""
import json
import math
import warnings

import pytest
from fuzzywuzzy import fuzz
from rouge import Rouge

from kvbench.errors import KvbenchError
from kvbench.longbench import metrics as m
from kvbench.longbench.scoring import (
    read_predictions, score_folder, score_sample, score_task, score_task_e, summarize,
)
from kvbench.longbench.tasks import ENGLISH_16, TASKS

TREC_CLASSES = ["Location", "Other location", "City"]


# ---- section 6.2 test vectors of the protocol reference -------------------------------------------------

@pytest.mark.parametrize("pred, gt, expected", [
    ("The Eiffel Tower.", "Eiffel Tower", 1.0),
    ("a big red apple", "the red apple", 0.8),
    ("Unanswerable", "unanswerable", 1.0),
    ("", "yes", 0),
])
def test_qa_f1_reference_vectors(pred, gt, expected):
    assert m.qa_f1_score(pred, gt) == pytest.approx(expected, abs=1e-15)


def test_qa_f1_no_overlap_is_int_zero_like_official():
    result = m.qa_f1_score("", "yes")
    assert result == 0 and type(result) is int


def test_qa_f1_zh_reference_vector():
    assert m.qa_f1_zh_score("答案是厦门大学。", "厦门大学。") == 0.5


@pytest.mark.parametrize("pred, gt, expected", [
    ("The cat sat on the mat. It was happy.", "The cat was on the mat.", 0.7999999952000001),
    ("the cat", "The cat", 0.4999999950000001),
    ("", "The cat", 0.0),
])
def test_rouge_reference_vectors_exact(pred, gt, expected):
    assert m.rouge_score(pred, gt) == expected


def test_rouge_zh_reference_vector_exact():
    assert m.rouge_zh_score("会议讨论了预算问题。", "本次会议主要讨论预算。") == 0.6666666616666668


@pytest.mark.parametrize("pred, gt, classes, expected", [
    ("Location", "Location", TREC_CLASSES, 1.0),
    ("Other location", "Other location", TREC_CLASSES, 1.0),
    ("City or Location", "City", TREC_CLASSES, 0.5),
    ("abc", "abc", ["a", "ab", "abc"], 0.5),  # list mutated while iterating: 'ab' survives
])
def test_classification_reference_vectors(pred, gt, classes, expected):
    assert m.classification_score(pred, gt, all_classes=classes) == expected


@pytest.mark.parametrize("fn, pred, gt, expected", [
    (m.retrieval_score, "Paragraph 12", "Paragraph 12", 1.0),
    (m.retrieval_score, "Paragraph 12 or Paragraph 3", "Paragraph 12", 0.5),
    (m.retrieval_score, "none", "Paragraph 12", 0.0),
    (m.retrieval_zh_score, "段落27", "段落27", 1.0),
    (m.count_score, "There are 14 unique paragraphs, out of 30.", "14", 0.5),
])
def test_number_metrics_reference_vectors(fn, pred, gt, expected):
    assert fn(pred, gt) == expected


@pytest.mark.parametrize("pred, gt, expected", [
    # These four give the same value with python-Levenshtein as with difflib (checked against both).
    ("\n    return self.foo(bar)\n# done", "    return self.foo(bar, baz)", 0.91),
    ("```python\n# comment\nx = 1", "x = 1", 1.0),
    ("  \nx = 1", "x = 1", 0.57),  # the whitespace-only line is the one scored
    ("url = 'http://a.b'\ny=2", "url = 'http://a.b'", 0.1),  # '//' skips the URL line
])
def test_code_sim_reference_vectors(pred, gt, expected):
    assert m.code_sim_score(pred, gt) == expected


def test_code_sim_uses_python_levenshtein_backend_like_kv_papers():
    assert m.FUZZ_BACKEND == "python-Levenshtein"
    assert fuzz.ratio("import numpy as np", "from numpy import array") == 44  # difflib would give 39
    assert m.code_sim_score("import numpy as np", "from numpy import array") == 0.44


# ---- adversarial cases --------------------------------------------------------------------------------

@pytest.mark.parametrize("fn, gt, kwargs", [
    (m.qa_f1_score, "Paris", {}),
    (m.qa_f1_zh_score, "厦门大学", {}),
    (m.rouge_score, "The cat sat.", {}),
    (m.rouge_zh_score, "会议讨论了预算", {}),
    (m.classification_score, "City", {"all_classes": TREC_CLASSES}),
    (m.retrieval_score, "Paragraph 3", {}),
    (m.retrieval_zh_score, "段落3", {}),
    (m.count_score, "7", {}),
    (m.code_sim_score, "x = 1", {}),
])
def test_empty_prediction_scores_zero_for_every_metric(fn, gt, kwargs):
    assert fn("", gt, **kwargs) == 0


def test_code_sim_empty_prediction_and_empty_ground_truth_is_one():
    # fuzz.ratio returns 100 for equal strings before it checks for empty ones.
    assert m.code_sim_score("", "") == 1.0
    assert m.code_sim_score("# only a comment", "") == 1.0


def test_rouge_dot_only_and_whitespace_predictions():
    assert m.rouge_score("...", "The cat") == 0.0  # 'Hypothesis is empty' swallowed
    assert m.rouge_score("   ", "The cat") == 0.0  # no exception, but no overlap


def _call_from_deep_stack(frames, fn):
    return fn() if frames == 0 else _call_from_deep_stack(frames - 1, fn)


def test_rouge_very_long_sentence_scores_zero_exactly_where_official_eval_does():
    # Official eval.py (script): 990 identical words still score, 991 raise RecursionError -> 0.0.
    words_990 = " ".join(f"w{i}" for i in range(990))
    words_991 = words_990 + " w990"
    assert m.rouge_score(words_990, words_990) == pytest.approx(1.0, abs=1e-7)
    assert m.rouge_score(words_991, words_991) == 0.0
    # The caller's stack depth must not move the boundary.
    assert _call_from_deep_stack(300, lambda: m.rouge_score(words_990, words_990)) > 0.99
    # Chinese path: rouge_zh_score is one frame deeper in the official code, so 990 words already fail.
    assert m.rouge_zh_score(words_990, words_990) == 0.0


OFFICIAL_STRUCTURE_PROBE = """
import sys
sys.path.insert(0, {src!r})
from kvbench.longbench.metrics import _recursion_headroom
def rouge_score(prediction, ground_truth, **kwargs):
    return _recursion_headroom()          # where official rouge_score calls Rouge().get_scores
def rouge_zh_score(prediction, ground_truth, **kwargs):
    return rouge_score(prediction, ground_truth)
def scorer(metric):
    score = 0.
    return max(score, metric("p", "g", all_classes=None))
print(scorer(rouge_score), scorer(rouge_zh_score))
"""


def test_official_rouge_headroom_matches_a_script_with_the_official_call_structure(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "official_like_eval.py"
    script.write_text(OFFICIAL_STRUCTURE_PROBE.format(src=str(Path(m.__file__).parents[2])))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    en, zh = map(int, done.stdout.split())
    assert (en, zh) == (m.OFFICIAL_ROUGE_HEADROOM["en"], m.OFFICIAL_ROUGE_HEADROOM["zh"])


def test_rouge_is_case_sensitive_counts_distinct_words_and_splits_on_dots():
    # distinct words: hyp {the, the} -> 1 word; LCS union of 'the' with ref 'the cat' -> 1; p=1, r=1/2
    assert m.rouge_score("the the", "the cat") == pytest.approx(2 * 0.5 / (1.5 + 1e-8), abs=1e-15)
    assert m.rouge_score("Cat", "cat") == 0.0


def test_rouge_l_shortcut_matches_the_default_rouge_object_exactly():
    official = Rouge()
    pairs = [
        ("The cat sat on the mat. It was happy.", "The cat was on the mat."),
        ("a b c. d e f. a c", "a c d. f e"),
        ("Summary: the board met; budget, approved!", "The board approved the budget."),
        ("x", "y"),
        ("   ", "ref"),
        ("one. two. three. one", "three two one. one"),
    ]
    for hyp, ref in pairs:
        expected = official.get_scores([hyp], [ref], avg=True)["rouge-l"]["f"]
        assert m.rouge_score(hyp, ref) == expected


def test_normalize_answer_keeps_non_ascii_punctuation():
    assert m.normalize_answer("The “Eiffel” Tower, an icon!") == "“eiffel” tower icon"
    assert m.qa_f1_score("“Paris”", "Paris") == 0


def test_normalize_zh_answer_drops_chinese_punctuation_and_spaces():
    assert m.normalize_zh_answer("「红楼梦」， 曹雪芹。ABC") == "红楼梦曹雪芹abc"
    # 》 is in the official list but 《 is not: a quirk kept verbatim.
    assert m.normalize_zh_answer("《书》") == "《书"


def test_qa_f1_zh_ignores_punctuation_tokens():
    assert m.qa_f1_zh_score("“厦门大学”！！", "厦门大学") == 1.0


def test_classification_skips_partial_match_removal_after_a_removed_item():
    # matches = [a, ab, abc]; 'a' removed, so 'ab' is skipped and stays: 1/2
    assert m.classification_score("abc", "abc", all_classes=["a", "ab", "abc"]) == 0.5
    # without a preceding removal the partial match is removed: 1/1
    assert m.classification_score("abc", "abc", all_classes=["ab", "abc"]) == 1.0


def test_classification_without_all_classes_is_a_clear_error():
    with pytest.raises(KvbenchError, match="all_classes"):
        m.classification_score("City", "City")


def test_retrieval_ground_truth_without_id_is_a_clear_error():
    with pytest.raises(KvbenchError, match="Paragraph"):
        m.retrieval_score("Paragraph 1", "no id here")


def test_metric_table_covers_every_task():
    assert {spec.metric for spec in TASKS.values()} <= set(m.METRICS)


# ---- per-sample and per-task scoring ------------------------------------------------------------------

def test_first_line_cut_only_for_the_four_few_shot_tasks():
    assert score_sample("triviaqa", "\nParis\nLondon", ["Paris"], None) == 1.0
    assert score_sample("hotpotqa", "\nParis\nLondon", ["Paris"], None) == pytest.approx(2 / 3)


def test_first_line_cut_keeps_a_leading_space_line():
    # lstrip('\n') only: the first line is ' ', which has no tokens
    assert score_sample("triviaqa", " \nParis", ["Paris"], None) == 0.0
    assert score_sample("trec", "\n\nCity\nLocation", ["City"], TREC_CLASSES) == 1.0


def test_score_sample_takes_max_over_answers_and_zero_without_answers():
    assert score_sample("hotpotqa", "red apple", ["blue", "red apple", "apple"], None) == 1.0
    assert score_sample("hotpotqa", "red apple", [], None) == 0.0


def test_score_task_official_rounding():
    records = [{"pred": "Paris", "answers": ["Paris"]}, {"pred": "no", "answers": ["Paris"]},
               {"pred": "no", "answers": ["Paris"]}]
    assert score_task("hotpotqa", records) == 33.33


def test_score_task_uses_all_classes_of_the_last_line():
    records = [
        {"pred": "City", "answers": ["City"], "all_classes": ["Nothing"]},
        {"pred": "Location", "answers": ["Location"], "all_classes": TREC_CLASSES},
    ]
    assert score_task("trec", records) == 100.0
    reversed_records = list(reversed(records))
    assert score_task("trec", reversed_records) == 0.0


def test_score_task_rejects_empty_and_malformed_input():
    with pytest.raises(KvbenchError, match="no predictions"):
        score_task("hotpotqa", [])
    with pytest.raises(KvbenchError, match="list of strings"):
        score_task("hotpotqa", [{"pred": "Paris", "answers": "Paris"}])
    with pytest.raises(KvbenchError, match="'pred' must be a string"):
        score_task("hotpotqa", [{"pred": None, "answers": ["Paris"]}])
    with pytest.raises(KvbenchError, match="all_classes"):
        score_task("lsht", [{"pred": "x", "answers": ["x"], "all_classes": None}])
    with pytest.raises(KvbenchError, match="unknown LongBench task"):
        score_task("hotpot", [{"pred": "x", "answers": ["x"]}])


def test_score_task_e_buckets_with_an_empty_bucket():
    records = [
        {"pred": "Paris", "answers": ["Paris"], "length": 3999},
        {"pred": "no", "answers": ["Paris"], "length": 100},
        {"pred": "no", "answers": ["Paris"], "length": 100},
        {"pred": "Paris", "answers": ["Paris"], "length": 8000},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning for the empty bucket
        buckets = score_task_e("hotpotqa_e", records)
    assert buckets["0-4k"] == 33.33 and buckets["8k+"] == 100.0
    assert math.isnan(buckets["4-8k"])
    assert list(buckets) == ["0-4k", "4-8k", "8k+"]


def test_score_task_e_needs_length():
    with pytest.raises(KvbenchError, match="length"):
        score_task_e("qasper", [{"pred": "x", "answers": ["x"]}])


# ---- aggregation --------------------------------------------------------------------------------------

def test_summarize_all_16_english_tasks():
    scores = {task: float(index) for index, task in enumerate(ENGLISH_16)}  # 0..15
    summary = summarize(scores)
    assert summary["avg_en16"] == 7.5
    assert summary["avg"] == 7.5
    assert summary["categories"] == {
        "Single-Doc QA": 1.0, "Multi-Doc QA": 4.0, "Summarization": 7.0, "Few-shot Learning": 10.0,
        "Synthetic": 12.5, "Code Completion": 14.5,
    }
    assert summary["avg_categories_en"] == pytest.approx((1 + 4 + 7 + 10 + 12.5 + 14.5) / 6)
    assert summary["categories_zh"] == {"Code Completion": 14.5}
    assert summary["avg_categories_zh"] is None


def test_summarize_without_one_task_has_no_avg_en16_and_drops_that_category():
    scores = {task: 10.0 for task in ENGLISH_16 if task != "musique"}
    summary = summarize(scores)
    assert summary["avg_en16"] is None
    assert summary["avg"] == 10.0
    assert "Multi-Doc QA" not in summary["categories"]
    assert summary["avg_categories_en"] is None


def test_summarize_official_leaderboard_check_llama2_chinese_table():
    # Llama2-7B-chat-4k, Chinese table of the README: category scores with a single task each plus code.
    scores = {"multifieldqa_zh": 11.9, "dureader": 5.2, "vcsum": 0.2, "lsht": 19.8,
              "passage_retrieval_zh": 0.5, "lcc": 48.1, "repobench-p": 48.1}
    summary = summarize(scores)
    assert round(summary["avg_categories_zh"], 1) == 14.3  # the README value
    assert summary["categories_zh"]["Code Completion"] == 48.1


def test_summarize_maps_e_names_to_base_tasks_and_handles_empty():
    assert summarize({"qasper_e": 20.0, "narrativeqa": 40.0})["categories"] == {}
    assert summarize({"qasper_e": 20.0})["avg"] == 20.0
    assert summarize({})["avg"] is None


# ---- prediction files ---------------------------------------------------------------------------------

def _write(path, text, newline="\n"):
    path.write_bytes(text.replace("\n", newline).encode("utf-8"))


def test_read_predictions_crlf_and_blank_trailing_lines(tmp_path):
    lines = [json.dumps({"pred": "Paris", "answers": ["Paris"]}), json.dumps({"pred": "x\ny", "answers": ["y"]})]
    path = tmp_path / "hotpotqa.jsonl"
    _write(path, "\n".join(lines) + "\n\n   \n", newline="\r\n")
    records = read_predictions(path)
    assert [r["pred"] for r in records] == ["Paris", "x\ny"]


def test_read_predictions_corrupt_line_names_file_and_line(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    _write(path, json.dumps({"pred": "a", "answers": ["a"]}) + "\n" + '{"pred": "b", "ans\n')
    with pytest.raises(KvbenchError, match=r"hotpotqa\.jsonl, line 2"):
        read_predictions(path)


def test_read_predictions_warns_on_duplicated_ids(tmp_path):
    line = json.dumps({"pred": "a", "answers": ["a"], "_id": "abc"})
    path = tmp_path / "hotpotqa.jsonl"
    _write(path, line + "\n" + line + "\n")
    with pytest.warns(UserWarning, match="1 duplicate _id"):
        assert len(read_predictions(path)) == 2


def test_score_folder_scores_and_summarizes(tmp_path):
    _write(tmp_path / "hotpotqa.jsonl", "\n".join(json.dumps(r) for r in [
        {"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 10},
        {"pred": "Rome", "answers": ["Paris"], "all_classes": None, "length": 10},
    ]) + "\n")
    _write(tmp_path / "trec.jsonl", json.dumps(
        {"pred": "City\nLocation", "answers": ["City"], "all_classes": TREC_CLASSES, "length": 10}) + "\n")
    summary = score_folder(tmp_path)
    assert summary["benchmark"] == "longbench"
    assert summary["tasks"] == {"hotpotqa": 50.0, "trec": 100.0}
    assert summary["n"] == {"hotpotqa": 2, "trec": 1}
    assert summary["result"] == {"hotpotqa": 50.0, "trec": 100.0}
    assert summary["avg"] == 75.0 and summary["avg_en16"] is None
    assert "longbench_e" not in summary


def test_score_folder_rejects_unknown_task_file_and_mixed_folders(tmp_path):
    record = json.dumps({"pred": "a", "answers": ["a"], "length": 1}) + "\n"
    _write(tmp_path / "hotpotqa.jsonl", record)
    _write(tmp_path / "qasper_e.jsonl", record)
    with pytest.raises(KvbenchError, match="mixes LongBench and LongBench-E"):
        score_folder(tmp_path)
    _write(tmp_path / "hotpot_qa.jsonl", record)
    with pytest.raises(KvbenchError, match="hotpot_qa.jsonl: unknown LongBench task"):
        score_folder(tmp_path)
