"""Tests of kvbench.report: collecting result folders, the papers' tables, paper-vs-ours, figures and the CLI."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kvbench.errors import KvbenchError
from kvbench.longbench.tasks import ENGLISH_16
from kvbench.report import (ReportWarning, budget_curve, collect, layer_allocation, layer_allocations,
                            group_table, longbench_table, paper_comparison, score_vs_bytes)
from kvbench.report.__main__ import main
from kvbench.sample_rows import sample_row, write_sample_scores

MODEL = {"name": "llama3-8b-instruct", "hub_id": "meta-llama/Meta-Llama-3-8B-Instruct"}
TASKS = ["narrativeqa", "hotpotqa", "lcc"]
# (method, budget) -> scores of TASKS. Chosen so that averages, ties and bold cells are easy to check by hand.
SCORES = {
    ("dynamickv", 128): [19.0, 35.0, 57.0],   # avg 37.00, ties SnapKV on lcc and Avg.
    ("fullkv", None): [20.0, 40.0, 60.0],     # avg 40.00
    ("snapkv", 512): [20.0, 39.0, 59.0],      # avg 39.33
    ("h2o", 128): [10.0, 30.0, 50.0],         # avg 30.00
    ("snapkv", 128): [18.0, 36.0, 57.0],      # avg 37.00
    ("dynamickv", 512): [20.5, 38.0, 60.0],   # avg 39.50
}


def write_run(root: Path, model: dict, method: str, budget, scores: dict[str, float], layer_kept=(8, 6, 4, 2),
              kv_bytes=(1000, 3000), benchmark: str = "longbench", protocol: str = "dynamickv",
              samples: dict[str, list[float]] | None = None, status: str = "complete", tag: str | None = None,
              folder: str | None = None) -> Path:
    """A run folder in the pipeline's format, with two predictions per task and sample_scores.jsonl.

    Without `samples`, each task's two samples both score the task score (a consistent, zero-width case);
    with `samples` ({task: per-sample scores 0..1}), scores.json gets their mean and count.
    """
    name = folder or (method if budget is None else f"{method}_{budget}") + (f"_{tag}" if tag else "")
    run_dir = root / model["name"] / benchmark / name
    (run_dir / "predictions").mkdir(parents=True)
    run = {"model": model, "method": {"name": method, "budget": budget}, "benchmark": benchmark,
           "protocol": protocol, "timing": {"total_s": 1.0}, "status": status, "config": {"tag": tag}}
    (run_dir / "run.json").write_text(json.dumps(run))
    samples = samples or {task: [score / 100.0] * 2 for task, score in scores.items()}
    scores = {task: round(100 * sum(v) / len(v), 2) for task, v in samples.items()}
    write_sample_scores(run_dir, [sample_row(task, f"{task}-{i}", v) for task, values in samples.items()
                                  for i, v in enumerate(values)])
    for task in scores:
        lines = [{"pred": "x", "answers": ["x"], "kv_bytes": b, "layer_kept": list(layer_kept), "prefill_s": 0.5 * i,
                  "decode_s": 1.0 * i} for i, b in enumerate(kv_bytes, 1)]
        (run_dir / "predictions" / f"{task}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run_dir / "scores.json").write_text(json.dumps({"benchmark": benchmark, "tasks": scores,
                                                     "n": {t: len(samples[t]) for t in scores}}))
    return run_dir


def write_needle(root: Path, model: dict, method: str, budget, mean_score: float, status: str = "complete") -> Path:
    run_dir = root / model["name"] / "needle" / (method if budget is None else f"{method}_{budget}")
    (run_dir / "predictions").mkdir(parents=True)
    run = {"model": model, "method": {"name": method, "budget": budget}, "benchmark": "needle", "protocol": "needle",
           "status": status}
    (run_dir / "run.json").write_text(json.dumps(run))
    line = {"context_length": 1000, "depth_percent": 50, "score": mean_score, "kv_bytes": 4096,
            "layer_kept": [64, 64, 64, 64], "prefill_s": 0.1, "decode_s": 0.2}
    (run_dir / "predictions" / "needle.jsonl").write_text(json.dumps(line) + "\n")
    (run_dir / "scores.json").write_text(json.dumps({"benchmark": "needle", "mean_score": mean_score, "n": 1}))
    return run_dir


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    for (method, budget), values in SCORES.items():
        write_run(root, MODEL, method, budget, dict(zip(TASKS, values)))
    write_needle(root, MODEL, "dynamickv", 64, 0.83)
    return root


def table_rows(markdown: str, kv: bool = False, decode: bool = False) -> list[list[str]]:
    """The cells of a Markdown table (rule line dropped), stopping at the first blank line; without `kv`, the
    "KV MiB" column (every table has one; `test_kv_bytes_held_are_shown_next_to_the_budget` checks it) is left out,
    without `decode` the "Decode" column (every table has one; `test_every_table_states_the_decode_schedule` checks
    it)."""
    rows = []
    for line in markdown.splitlines():
        if not line.startswith("|"):
            break
        if not set(line) <= set("|-: "):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    header = next((r for r in rows if "KV MiB" in r or "Decode" in r), None)
    if header is None:
        return rows
    drops = sorted(header.index(name) for name, keep in (("KV MiB", kv), ("Decode", decode))
                   if not keep and name in header)
    return [[cell for i, cell in enumerate(r) if i not in drops] for r in rows]


# ------------------------------------------------------------------------------------------------------- collect

def test_collect_gives_one_row_per_run_and_task(results):
    df = collect([results])
    assert len(df) == 6 * 3 + 1
    full = df[df["method"] == "FullKV"]
    assert full["budget"].isna().all() and sorted(full["task"]) == sorted(TASKS)
    snap = df[(df["method"] == "SnapKV") & (df["budget"] == 128) & (df["task"] == "hotpotqa")].iloc[0]
    assert snap["score"] == 36.0 and snap["n"] == 2 and snap["protocol"] == "dynamickv"
    assert snap["kv_bytes_mean"] == 2000.0 and snap["prefill_s_mean"] == 0.75 and snap["decode_s_mean"] == 1.5
    needle = df[df["benchmark"] == "needle"].iloc[0]
    assert needle["task"] == "needle" and needle["score"] == pytest.approx(83.0) and needle["budget"] == 64


def test_collect_accepts_single_run_folder_and_rejects_missing_path(results, tmp_path):
    one = collect(results / "llama3-8b-instruct" / "longbench" / "snapkv_128")
    assert list(one["method"].unique()) == ["SnapKV"] and len(one) == 3
    with pytest.raises(KvbenchError, match="does not exist"):
        collect([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(KvbenchError, match="no readable runs"):
        collect([tmp_path / "empty"])


def test_collect_skips_corrupt_run_with_warning_or_raises_when_strict(results):
    bad = results / "llama3-8b-instruct" / "longbench" / "h2o_128" / "scores.json"
    bad.write_text("{not json")
    with pytest.warns(ReportWarning, match="h2o_128"):
        df = collect([results])
    assert "H2O" not in set(df["method"]) and len(df) == 5 * 3 + 1
    with pytest.raises(KvbenchError, match=r"h2o_128.*scores\.json"):
        collect([results], strict=True)


def test_layer_allocations_average_the_layer_kept_lists(results):
    alloc = layer_allocations([results])
    snap = alloc[(alloc["method"] == "SnapKV") & (alloc["budget"] == 128) & (alloc["task"] == "lcc")]
    assert list(snap["layer"]) == [0, 1, 2, 3] and list(snap["kept_mean"]) == [8.0, 6.0, 4.0, 2.0]
    assert set(alloc["task"]) == set(TASKS) | {"needle"}


# -------------------------------------------------------------------------------------------------------- tables

def test_markdown_table_layout_averages_and_bold(results):
    text = longbench_table(collect([results]))
    rows = table_rows(text)
    assert rows[0][4:] == ["Single-Doc QA", "Multi-Doc QA", "Code", ""]
    assert rows[1] == ["Model", "Budget", "Method", "n", "NrtvQA", "HotpotQA", "Lcc", "Avg."]
    body = rows[2:]
    assert [r[2] for r in body] == ["FullKV", "H2O", "SnapKV", "DynamicKV", "SnapKV", "DynamicKV"]
    assert [r[1] for r in body] == ["Full", "128", "", "", "512", ""]
    assert [r[3] for r in body] == ["2"] * 6
    assert body[0][0] == "llama3-8b-instruct" and all(r[0] == "" for r in body[1:])
    assert body[0][4:] == ["20.00", "40.00", "60.00", "40.00"]          # FullKV is never bold
    assert body[1][4:] == ["10.00", "30.00", "50.00", "30.00"]
    # Two samples per task: no difference is significant, so every bold cell carries the dagger.
    assert body[2][4:] == ["18.00", "**36.00**†", "**57.00**†", "**37.00**†"]  # ties with DynamicKV are both bold
    assert body[3][4:] == ["**19.00**†", "35.00", "**57.00**†", "**37.00**†"]
    assert body[4][4:] == ["20.00", "**39.00**†", "59.00", "39.33"]
    assert body[5][4:] == ["**20.50**†", "38.00", "**60.00**†", "**39.50**†"]
    assert "mean over the 3 task(s) shown" in text and "†: not significantly better than the second best" in text
    plain = table_rows(longbench_table(collect([results]), significance=False))
    assert plain[4][4:] == ["18.00", "**36.00**", "**57.00**", "**37.00**"]


def test_relative_table_is_percent_of_fullkv(results):
    body = table_rows(longbench_table(collect([results]), relative=True, ci="pm"))[2:]
    assert body[0][4:] == ["100.0", "100.0", "100.0", "100.0"]
    assert body[3][4:] == ["**95.0**†", "87.5", "**95.0**†", "**92.5**†"]   # DynamicKV 128: 19/20, 35/40, 57/60, 37/40
    assert body[1][4:] == ["50.0", "75.0", "83.3", "75.0"]                  # H2O 128 (no CI on a ratio)


def _agnostic(run_dir: Path) -> Path:
    run = json.loads((run_dir / "run.json").read_text())
    run["config"]["benchmark"] = {"query": "agnostic"}
    (run_dir / "run.json").write_text(json.dumps(run))
    return run_dir


def test_relative_agnostic_rows_are_percent_of_the_agnostic_fullkv(tmp_path):
    root = tmp_path / "results"
    write_run(root, MODEL, "fullkv", None, dict(zip(TASKS, [20.0, 40.0, 60.0])))
    write_run(root, MODEL, "snapkv", 128, dict(zip(TASKS, [10.0, 20.0, 30.0])))
    _agnostic(write_run(root, MODEL, "snapkv", 128, dict(zip(TASKS, [5.0, 10.0, 15.0])), folder="snapkv_128_agnostic"))
    table = table_rows(longbench_table(collect([root]), relative=True))
    assert table[1][:5] == ["Model", "Query", "Budget", "Method", "n"]  # the query mode is a column, not a label
    rows = {(r[1], r[3]): r[5:] for r in table[2:]}
    assert rows[("agnostic", "SnapKV")] == ["25.0", "25.0", "25.0", "25.0"]  # no agnostic FullKV: the aware one
    _agnostic(write_run(root, MODEL, "fullkv", None, dict(zip(TASKS, [10.0, 20.0, 30.0])), folder="fullkv_agnostic"))
    rows = {(r[1], r[3]): r[5:] for r in table_rows(longbench_table(collect([root]), relative=True))[2:]}
    assert rows[("agnostic", "SnapKV")] == ["50.0", "50.0", "50.0", "50.0"]
    assert rows[("agnostic", "FullKV")] == ["100.0"] * 4 and rows[("aware", "SnapKV")] == ["50.0"] * 4
    assert rows[("aware", "FullKV")] == ["100.0"] * 4
    # Bold ranks the compressed methods of one query mode: each SnapKV row is alone in its mode, so none is bold.
    assert not any("**" in c for r in rows.values() for c in r)


def test_relative_needs_fullkv(results):
    df = collect([results])
    with pytest.raises(KvbenchError, match="needs a FullKV run of llama3-8b-instruct"):
        longbench_table(df[df["method"] != "FullKV"], relative=True)


def test_latex_table_uses_booktabs_and_textbf(results):
    tex = longbench_table(collect([results]), fmt="latex")
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\multicolumn{6}{c}{}", "Single-Doc QA"):
        assert rule in tex
    assert r" & prefill &  & DynamicKV & 0.00191 & 2 & \textbf{19.00}$^\dagger$ & 35.00 & \textbf{57.00}$^\dagger$ & " in tex
    assert r"llama3-8b-instruct & prefill & Full & FullKV & 0.00191 & 2 & 20.00" in tex
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert tex.count(r"\midrule") == 3                       # header, then one rule before each new budget
    assert r"{\footnotesize Note: Bold" in tex and r"$\geq$ 0.05" in tex


def test_csv_table_parses_back_to_the_same_numbers(results):
    parsed = pd.read_csv(io.StringIO(longbench_table(collect([results]), fmt="csv")))
    assert list(parsed.columns) == ["model", "decode", "budget", "method", "kv mib", "n", "NrtvQA", "HotpotQA", "Lcc",
                                    "Avg."]
    assert set(parsed["decode"]) == {"prefill"}
    assert list(parsed["budget"].astype(str)) == ["Full", "128", "128", "128", "512", "512"]
    assert list(parsed["Avg."]) == [40.0, 30.0, 37.0, 37.0, 39.33, 39.5]
    assert parsed.loc[3, "NrtvQA"] == 19.0 and parsed.loc[5, "Lcc"] == 60.0


def test_chinese_table_and_language_errors(results, tmp_path):
    df = collect([results])
    with pytest.raises(KvbenchError, match="no Chinese longbench tasks"):
        longbench_table(df, language="zh")
    with pytest.raises(KvbenchError, match="'en' or 'zh'"):
        longbench_table(df, language="fr")
    with pytest.raises(KvbenchError, match="fmt must be one of"):
        longbench_table(df, fmt="pdf")
    with pytest.raises(KvbenchError, match="ci must be one of"):
        longbench_table(df, ci="sd")
    write_run(tmp_path / "zh", MODEL, "fullkv", None, {"dureader": 30.0, "lsht": 20.0, "narrativeqa": 5.0})
    rows = table_rows(longbench_table(collect([tmp_path / "zh"]), language="zh"))
    assert rows[1][4:] == ["DuReader", "LSHT", "Avg."] and rows[2][4:] == ["30.00", "20.00", "25.00"]


def test_row_missing_a_task_gets_no_average(results, tmp_path):
    write_run(tmp_path / "r", MODEL, "pyramidkv", 128, {"narrativeqa": 17.0, "hotpotqa": 33.0})
    text = longbench_table(collect([results, tmp_path / "r"]))
    pyramid = [r for r in table_rows(text) if r[2] == "PyramidKV"][0]
    assert pyramid[4:] == ["17.00", "33.00", "-", "-"] and "left empty for rows missing a task" in text


def test_colliding_runs_are_reported_and_kept_apart_by_tag(results, tmp_path):
    """Issue 10 item 11: a tag= variant used to make the report drop the whole LongBench table."""
    write_run(tmp_path / "t", MODEL, "snapkv", 128, dict(zip(TASKS, [1.0, 2.0, 3.0])), tag="perkv")
    with pytest.warns(ReportWarning, match=r"collision: 2 runs give SnapKV budget 128 for llama3-8b-instruct: "
                                           r".*snapkv_128, .*snapkv_128_perkv"):
        rows = table_rows(longbench_table(collect([results, tmp_path / "t"])))
    assert rows[1][:5] == ["Model", "Tag", "Budget", "Method", "n"]
    snap = [r for r in rows if r[3] == "SnapKV"]
    assert [(r[1], r[5:]) for r in snap[:2]] == [("", ["18.00", "**36.00**†", "**57.00**†", "**37.00**†"]),
                                                 ("perkv", ["1.00", "2.00", "3.00", "2.00"])]
    # Same tag (e.g. two output_dir= copies): the run folders' names tell them apart.
    write_run(tmp_path / "u", MODEL, "snapkv", 128, dict(zip(TASKS, [4.0, 5.0, 6.0])), folder="copy")
    with pytest.warns(ReportWarning, match="collision"):
        rows = table_rows(longbench_table(collect([results, tmp_path / "u"])))
    assert [r[1] for r in rows if r[3] == "SnapKV"][:2] == ["copy", "snapkv_128"]


def test_incomplete_runs_are_marked_in_every_table(results, tmp_path, capsys):
    write_run(tmp_path / "s", MODEL, "pyramidkv", 128, dict(zip(TASKS, [1.0, 2.0, 3.0])), status="interrupted")
    write_needle(tmp_path / "s", MODEL, "snapkv", 64, 0.5, status="running")
    df = collect([results, tmp_path / "s"])
    rows = table_rows(longbench_table(df))
    assert rows[1][:5] == ["Model", "Budget", "Method", "Status", "n"]
    assert [r[3] for r in rows[2:] if r[2] == "PyramidKV"] == ["interrupted"]
    assert [r[3] for r in rows[2:] if r[2] != "PyramidKV"] == [""] * 6
    assert "status,n" in longbench_table(df, fmt="csv").splitlines()[0]
    from kvbench.report.__main__ import _benchmark_sections
    _benchmark_sections(df, tmp_path / "rep", [])
    needle = table_rows((tmp_path / "rep" / "needle.md").read_text())
    assert needle[0] == ["Model", "Method", "Needles", "Budget", "Score", "95% CI", "Retrieval", "Retrieval 95% CI",
                         "n", "Status"]
    assert [r[9] for r in needle[1:]] == ["running", ""]          # SnapKV 64 is still running


def test_significance_bold_without_dagger_only_when_the_paired_test_says_so(tmp_path):
    rng = np.random.default_rng(0)
    base = (rng.random(80) < 0.5).astype(float)
    strong = np.where(rng.random(80) < 0.6, 1.0, base)           # clearly better on the same samples
    close = np.where(rng.random(80) < 0.03, 1.0, base)           # barely better
    write_run(tmp_path, MODEL, "h2o", 128, {}, samples={"qasper": list(base), "lcc": list(base)})
    write_run(tmp_path, MODEL, "snapkv", 128, {}, samples={"qasper": list(strong), "lcc": list(close)})
    rows = table_rows(longbench_table(collect([tmp_path]), ci="range"))
    snap = [r for r in rows if r[2] == "SnapKV"][0]
    qasper, lcc = snap[4], snap[5]
    assert qasper.startswith("**") and not qasper.endswith("†")          # significant: bold, no dagger
    assert lcc.startswith("**") and lcc.endswith("†")                      # not significant: dagger
    low, high = map(float, qasper.strip("*").split("[")[1].rstrip("]").split(","))
    assert low < 100 * strong.mean() < high and high - low > 10           # n=80 binary: a wide interval
    # Different samples cannot be paired: no claim of significance.
    write_run(tmp_path / "other", MODEL, "pyramidkv", 128, {}, samples={"qasper": [1.0] * 80, "lcc": [1.0] * 80})
    (tmp_path / "other" / MODEL["name"] / "longbench" / "pyramidkv_128" / "sample_scores.jsonl").write_text(
        "".join(json.dumps(sample_row(t, f"other-{i}", 1.0)) + "\n" for t in ("qasper", "lcc") for i in range(80)))
    rows = table_rows(longbench_table(collect([tmp_path, tmp_path / "other"])))
    pyramid = [r for r in rows if r[2] == "PyramidKV"][0]
    assert pyramid[4:] == ["**100.00**†", "**100.00**†", "**100.00**†"]


def test_ci_views_and_sample_mismatch(tmp_path):
    write_run(tmp_path, MODEL, "snapkv", 128, {}, samples={"qasper": [0.0, 1.0] * 20, "lcc": [0.5] * 40})
    df = collect([tmp_path])
    row = df.set_index("task").loc["lcc"]
    assert row["ci_low"] == row["ci_high"] == pytest.approx(50.0)                 # all equal: zero width
    body = table_rows(longbench_table(df, ci="pm"))[2]
    assert body[5] == "50.00 ± 0.00" and body[4].startswith("50.00 ± 1")      # 0/1 x 40: half-width ~15
    csv = pd.read_csv(io.StringIO(longbench_table(df, fmt="csv", ci="range")))
    assert {"Qasper lo", "Qasper hi", "Avg. lo", "Avg. hi"} <= set(csv.columns)
    assert csv.loc[0, "Avg. lo"] < 50.0 < csv.loc[0, "Avg. hi"]
    scores = tmp_path / MODEL["name"] / "longbench" / "snapkv_128" / "scores.json"
    scores.write_text(json.dumps({"benchmark": "longbench", "tasks": {"qasper": 50.0, "lcc": 60.0},
                                  "n": {"qasper": 40, "lcc": 40}}))
    with pytest.warns(ReportWarning, match="task lcc has 40 samples averaging 50.00, but scores.json says n=40, "
                                           "60.00; its CI is left out"):
        df = collect([tmp_path])
    assert df.set_index("task")["ci_low"].isna().tolist() == [False, True]


def test_longbench_e_table_by_length_bucket(tmp_path):
    # scores.json of a LongBench-E run keys tasks by their base name, as score_folder does.
    run_dir = write_run(tmp_path, MODEL, "snapkv", 128, {}, benchmark="longbench_e",
                        samples={"qasper": [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]})
    buckets = ["0-4k", "0-4k", "4-8k", "4-8k", "8k+", "8k+"]
    write_sample_scores(run_dir, [sample_row("qasper", f"q{i}", s, length=1000, bucket=b)
                                  for i, (s, b) in enumerate(zip([1.0, 0.0, 1.0, 1.0, 0.0, 0.0], buckets))])
    text = group_table(collect([tmp_path]), "longbench_e", "en")
    rows = table_rows(text)
    assert rows[0] == ["Model", "Budget", "Method", "Tasks", "0-4k", "n 0-4k", "4-8k", "n 4-8k", "8k+", "n 8k+"]
    assert rows[1][4:] == ["50.00 ± 50.00", "2", "100.00 ± 0.00", "2", "0.00 ± 0.00", "2"]
    assert "resampled within each task's bucket" in text
    assert "\\toprule" in group_table(collect([tmp_path]), "longbench_e", "en", fmt="latex")


def test_a_benchmark_declares_its_own_group_tables_and_the_report_writes_them(tmp_path):
    """`Benchmark.group_table` (LongBench-E's by input length) is a declaration, not a name the report knows: a
    benchmark of its own gets its table by a per-sample field written in every format and into report.html."""
    from kvbench.benchmark import Benchmark, register, unregister

    class Graded(Benchmark):
        name = "graded_probe"
        group_table = {"field": "grade", "groups": ("easy", "hard"), "stem": "by_grade", "title": "by difficulty",
                       "unit": "grade", "note": "Mean over the run's tasks of each grade's score (0-100)."}

    register(Graded)
    try:
        run_dir = write_run(tmp_path / "r", MODEL, "snapkv", 128, {}, benchmark="graded_probe",
                            samples={"t1": [1.0, 0.0, 1.0, 1.0]})
        write_sample_scores(run_dir, [sample_row("t1", f"s{i}", v, grade=g) for i, (v, g) in
                                      enumerate(zip([1.0, 0.0, 1.0, 1.0], ["easy", "easy", "hard", "hard"]))])
        out = tmp_path / "out"
        assert main([str(tmp_path / "r"), "--out", str(out)]) == 0
        text = (out / "graded_probe_by_grade.md").read_text()
        rows = table_rows(text)
        assert rows[0][-4:] == ["easy", "n easy", "hard", "n hard"] and rows[1][-4:] == [
            "50.00 ± 50.00", "2", "100.00 ± 0.00", "2"]
        assert "Note: Mean over the run's tasks of each grade's score (0-100)." in text
        assert "resampled within each task's grade" in text
        assert {"graded_probe_by_grade.tex", "graded_probe_by_grade.csv"} <= {p.name for p in out.iterdir()}
        assert '<h2 id="graded_probe_by_grade">graded_probe by difficulty</h2>' in (out / "report.html").read_text()
    finally:
        unregister("graded_probe")


def test_two_protocols_get_their_own_column(results, tmp_path):
    write_run(tmp_path / "p", MODEL, "snapkv", 128, dict(zip(TASKS, [1.0, 2.0, 3.0])), protocol="official")
    rows = table_rows(longbench_table(collect([results, tmp_path / "p"])))
    assert rows[1][:5] == ["Model", "Protocol", "Budget", "Method", "n"]
    assert ["llama3-8b-instruct", "official", "128", "SnapKV", "2", "1.00", "2.00", "3.00", "2.00"] in rows


def test_tables_use_pandas_renderers():
    import inspect
    from kvbench.report import tables
    source = inspect.getsource(tables)
    assert "to_markdown(" in source and "to_latex(" in source and ".ljust(" not in source


# -------------------------------------------------------------------------------------------------- paper vs ours

def test_paper_comparison_without_matching_runs_says_what_reproduces(tmp_path):
    write_run(tmp_path, {"name": "tiny-random-llama", "hub_id": "local/tiny"}, "dynamickv", 512, {"lcc": 10.0})
    write_run(tmp_path, MODEL, "dynamickv", 128, {"lcc": 10.0})          # a paper model, but not at budget 512
    note = paper_comparison(collect([tmp_path]))
    assert "No run matches a published setting" in note and "budget 512" in note and "Qwen2-7B-Instruct" in note


def test_paper_comparison_puts_paper_and_ours_side_by_side(tmp_path):
    scores = {task: 40.0 + (1.0 if i % 2 else -1.0) for i, task in enumerate(ENGLISH_16)}   # mean 40.0
    write_run(tmp_path, MODEL, "dynamickv", 512, scores)
    write_run(tmp_path, MODEL, "fullkv", None, {t: 42.0 for t in ENGLISH_16[:3]})           # incomplete: no avg
    write_needle(tmp_path, {"name": "Mistral-7B-Instruct-v0.2", "hub_id": ""}, "pyramidkv", 64, 0.7)
    text = paper_comparison(collect([tmp_path]))
    rows = {(r[0], r[1]): r for r in table_rows(text.split("\n\n", 1)[1])}
    assert rows[("Llama-3-8B-Instruct", "DynamicKV")][2:6] == ["40.73", "40.00", "-0.73", "16/16"]
    assert rows[("Llama-3-8B-Instruct", "FullKV")][2:6] == ["41.95", "-", "-", "3/16"]
    needle = table_rows(text.split("Needle-in-a-Haystack")[1].split("\n\n", 1)[1])
    assert needle[1][:6] == ["Mistral-7B-Instruct-v0.2", "PyramidKV", "64", "72.00", "70.00", "-2.00"]


# ------------------------------------------------------------------------------------------------------- figures

def test_figures_are_written_as_png_and_pdf(results, tmp_path):
    df = collect([results])
    alloc = layer_allocations([results])
    paths = budget_curve(df, tmp_path / "fig" / "curve.png") + score_vs_bytes(df, tmp_path / "fig" / "bytes")
    paths += layer_allocation(alloc, tmp_path / "fig" / "alloc", budget=128, benchmark="longbench")
    assert [p.name for p in paths] == ["curve.png", "curve.pdf", "bytes.png", "bytes.pdf", "alloc.png", "alloc.pdf"]
    for path in paths:
        head = path.read_bytes()[:8]
        assert path.stat().st_size > 1000 and (head.startswith(b"\x89PNG") or head.startswith(b"%PDF"))
    with pytest.raises(KvbenchError, match=r"several budgets \(128, 512\)"):
        layer_allocation(alloc[alloc["benchmark"] == "longbench"], tmp_path / "fig" / "x")
    with pytest.raises(KvbenchError, match=r"several benchmarks \(longbench, needle\)"):
        layer_allocation(alloc, tmp_path / "fig" / "x", budget=128)


def test_budget_curve_needs_a_compressed_run(results, tmp_path):
    df = collect([results])
    with pytest.raises(KvbenchError, match="at least one compressed-method run"):
        budget_curve(df[df["method"] == "FullKV"], tmp_path / "c")


# ----------------------------------------------------------------------------------------------------------- CLI

def test_cli_prints_tables_and_writes_everything(results, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(results), "--out", str(out), "--format", "md,csv"]) == 0
    printed = capsys.readouterr().out
    assert "## longbench (English), scores" in printed and "**39.50 ± 0.00**†" in printed and "83.00" in printed
    names = {p.name for p in out.iterdir()}
    expected = {"results.csv", "longbench_en.md", "longbench_en.csv", "longbench_en_relative.md",
                "paper_comparison.md", "needle.md", "budget_curve.png", "score_vs_bytes.pdf",
                "layer_allocation_llama3-8b-instruct_longbench_b128.png",
                "layer_allocation_llama3-8b-instruct_needle_b64.png"}
    assert expected <= names and "longbench_en.tex" not in names
    assert not [n for n in names if n.endswith(".tmp")]


def test_every_table_and_legend_states_the_decode_schedule(results, tmp_path, monkeypatch):
    """Every run here compresses at prefill only: every table still says so (`prefill`), and a decoding-time run
    reads `every N`, in every format, the needle's list, the runs of report.html and every figure legend."""
    from kvbench.report import figures

    df = collect([results])
    rows = table_rows(longbench_table(df), decode=True)
    assert rows[1][:3] == ["Model", "Decode", "Budget"] and {r[1] for r in rows[2:]} == {"prefill"}
    assert set(pd.read_csv(io.StringIO(longbench_table(df, fmt="csv")))["decode"]) == {"prefill"}
    assert longbench_table(df, fmt="latex").count(" & prefill & ") == 6
    out = tmp_path / "report"
    assert main([str(results), "--out", str(out), "--format", "md"]) == 0
    needle = table_rows((out / "needle.md").read_text(), decode=True)
    assert needle[1][needle[0].index("Decode")] == "prefill"
    assert "Decode prefill" in (out / "paper_comparison.md").read_text()
    page = (out / "report.html").read_text()
    assert "<th>Decode</th>" in page and '<td data-v="prefill">prefill</td>' in page
    # A decoding-time run of its own: `every 16` in the table and the legend, next to `prefill`.
    decode = write_run(tmp_path / "d", MODEL, "snapkv", 128, dict(zip(TASKS, [1.0, 2.0, 3.0])), folder="snapkv_d16")
    run = json.loads((decode / "run.json").read_text())
    (decode / "run.json").write_text(json.dumps({**run, "method": {**run["method"], "decode_interval": 16}}))
    df = collect([results, tmp_path / "d"])
    rows = table_rows(longbench_table(df), decode=True)
    assert [r[1] for r in rows[2:]] == ["prefill"] * 6 + ["every 16"]
    legends = []
    monkeypatch.setattr(figures, "_save", lambda fig, out: legends.append(
        [t.get_text() for legend in fig.legends for t in legend.get_texts()]) or [])
    budget_curve(df, tmp_path / "curve")
    score_vs_bytes(df, tmp_path / "bytes")
    layer_allocation(layer_allocations([results]), tmp_path / "alloc", budget=128, benchmark="longbench")
    for labels in legends:
        assert labels and all(label.endswith("(prefill)") or label.endswith("(every 16)") for label in labels)
    assert "SnapKV (every 16)" in legends[0] and "FullKV (prefill)" in legends[0] and "SnapKV (prefill)" in legends[1]


def _clamp_lines(predictions: Path, asked: int = 31, held: int = 33) -> None:
    """Mark every line of a predictions file as the pipeline does where a fraction budget was held at SnapKV's
    minimum (window + 1)."""
    lines = [json.loads(line) for line in predictions.read_text().splitlines()]
    predictions.write_text("".join(json.dumps({**line, "budget_tokens": held, "budget_asked": asked,
                                               "budget_clamped": True}) + "\n" for line in lines))


def test_a_budget_held_at_the_methods_minimum_is_marked_with_a_note(tmp_path):
    """A fraction budget below the method's window + 1 is held there: the Budget cell says so (‡) in every format
    and the needle list, with a note naming the run, the tokens held and on how many samples."""
    root = tmp_path / "results"
    write_run(root, MODEL, "fullkv", None, dict(zip(TASKS, [20.0, 40.0, 60.0])))
    write_run(root, MODEL, "h2o", 0.03125, dict(zip(TASKS, [10.0, 30.0, 50.0])))
    snap = write_run(root, MODEL, "snapkv", 0.03125, dict(zip(TASKS, [18.0, 36.0, 57.0])))
    for task in TASKS[:2]:
        _clamp_lines(snap / "predictions" / f"{task}.jsonl")
    needle = write_needle(root, MODEL, "snapkv", 0.03125, 0.5)
    _clamp_lines(needle / "predictions" / "needle.jsonl")
    df = collect([root])
    text = longbench_table(df)
    budgets = {row[2]: row[1] for row in table_rows(text)[2:]}
    assert budgets == {"FullKV": "Full", "H2O": "0.03125", "SnapKV": "0.03125‡"}  # H2O: asked what it held
    note = ("‡: the budget asked fewer tokens of a prompt than the method's minimum (its window + 1; kvpress-style "
            "ratios: its window) and was held there (prediction lines' budget_clamped; KV MiB is what was held): "
            "SnapKV 0.03125: 33 tokens on 4 of 6 samples.")
    assert f"Note: {note}" in text
    csv = pd.read_csv(io.StringIO(longbench_table(df, fmt="csv")))
    assert list(csv["budget"].astype(str)) == ["Full", "0.03125", "0.03125"]
    assert csv["budget clamped"].fillna("").tolist() == ["", "", "33 tokens on 4 of 6 samples"]
    assert r"0.03125$^\ddagger$ & SnapKV" in longbench_table(df, fmt="latex")
    out = tmp_path / "report"
    assert main([str(root), "--out", str(out), "--format", "md"]) == 0
    listed = (out / "needle.md").read_text()
    rows = table_rows(listed)
    assert rows[1][rows[0].index("Budget")] == "0.03125‡"
    assert "SnapKV 0.03125: 33 tokens on 1 of 1 samples." in listed
    assert '<td data-v="1000000000.03125">0.03125‡</td>' in (out / "report.html").read_text()


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--format", "html"])


@pytest.mark.parametrize("name, hub_id, expected", [
    ("llama3_8b_instruct", "", "Llama-3-8B-Instruct"),
    ("mistral_7b_instruct_v02", "", "Mistral-7B-Instruct-v0.2"),
    ("qwen2_7b_instruct", "", "Qwen2-7B-Instruct"),
    ("internlm25_7b_chat_1m", "", "InternLM-2.5-7B-Chat-1M"),
    ("my-llama", "meta-llama/Meta-Llama-3-8B-Instruct", "Llama-3-8B-Instruct"),
    ("qwen2_5_7b_instruct", "Qwen/Qwen2.5-7B-Instruct", None),    # a different model must not match
    ("tiny_llama", "", None),
])
def test_paper_model_names_match_config_names_and_hub_ids(name, hub_id, expected):
    from kvbench.report.tables import paper_model_name
    assert paper_model_name(name, hub_id) == expected


def test_figures_carry_ci_bands_and_error_bars(tmp_path):
    from kvbench.report.figures import _run_averages
    rng = np.random.default_rng(1)
    for method, budget, p in (("fullkv", None, 0.7), ("snapkv", 64, 0.4), ("snapkv", 128, 0.5)):
        write_run(tmp_path / "r", MODEL, method, budget, {},
                  samples={t: list((rng.random(50) < p).astype(float)) for t in TASKS})
    df = collect([tmp_path / "r"])
    runs, _ = _run_averages(df, "longbench", "en")
    assert (runs["ci_low"] < runs["score"]).all() and (runs["score"] < runs["ci_high"]).all()
    assert ((runs["ci_high"] - runs["ci_low"]) < 20).all()               # 150 samples per run: a few points wide
    paths = budget_curve(df, tmp_path / "curve") + score_vs_bytes(df, tmp_path / "bytes")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_a_markdown_frame_writes_text_cells_as_given_and_numbers_with_two_decimals():
    import pandas as pd
    from kvbench.report.tables import markdown_frame

    frame = pd.DataFrame({"Method": ["SnapKV", "KVzip"], "KV MiB": ["0.00312", "58.2"], "Budget": ["0.03125", "128"],
                          "Score": [12.3456, None]})
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown_frame(frame).splitlines()[2:]]
    assert rows == [["SnapKV", "0.00312", "0.03125", "12.35"], ["KVzip", "58.2", "128", "-"]]
