"""RULER report: the tasks x methods table (best compressed score in bold), Markdown/LaTeX/CSV, and figures."""
from __future__ import annotations

import json

import pytest

from kvbench.errors import KvbenchError
from kvbench.ruler.report import collect_ruler, ruler_table, write_ruler_report


def _run(root, method, budget, lengths, query="aware", agnostic_budget=False):
    folder = root / f"{method}_{budget}_{query}"
    folder.mkdir(parents=True)
    config = {"model": {"name": "smollm2_135m"}, "method": {"name": method, "budget_agnostic": method == "fullkv"},
              "budget": budget}
    (folder / "run.json").write_text(json.dumps({"config": config, "status": "complete"}))
    scores = {"benchmark": "ruler", "query": query, "template": "chat",
              "lengths": {str(n): {"tasks": tasks, "n": {t: 3 for t in tasks}} for n, tasks in lengths.items()}}
    (folder / "scores.json").write_text(json.dumps(scores))
    return folder


@pytest.fixture()
def results(tmp_path):
    _run(tmp_path, "fullkv", 128, {1024: {"niah_single_1": 100.0, "vt": 80.0}, 2048: {"niah_single_1": 90.0, "vt": 60.0}})
    _run(tmp_path, "snapkv", 128, {1024: {"niah_single_1": 66.67, "vt": 40.0}, 2048: {"niah_single_1": 33.33, "vt": 20.0}})
    _run(tmp_path, "dynamickv", 128, {1024: {"niah_single_1": 33.33, "vt": 60.0},
                                      2048: {"niah_single_1": 33.33, "vt": 40.0}})
    _run(tmp_path, "snapkv", 64, {1024: {"niah_single_1": 0.0, "vt": 20.0}})
    (tmp_path / "needle_run").mkdir()
    (tmp_path / "needle_run" / "run.json").write_text("{}")
    (tmp_path / "needle_run" / "scores.json").write_text(json.dumps({"benchmark": "needle"}))
    return tmp_path


def test_collect_keeps_ruler_runs_only(results):
    df = collect_ruler(results)
    assert len(df) == 14 and set(df["method"]) == {"FullKV", "SnapKV", "DynamicKV"}
    assert df[df["method"] == "FullKV"]["budget"].isna().all()


def test_table_layout_and_bold_best(results):
    df = collect_ruler(results)
    md = ruler_table(df, 1024)
    lines = md.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["Model", "Query", "Budget", "Method", "KV MiB",
                                                              "S1", "VT", "Avg."]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    assert [r[2:4] for r in rows] == [["Full", "FullKV"], ["64", "SnapKV"], ["128", "SnapKV"], ["128", "DynamicKV"]]
    assert rows[0][5:] == ["100.00", "80.00", "90.00"]  # FullKV is the reference, never bold
    assert rows[2][5] == "**66.67**" and rows[3][6] == "**60.00**" and rows[2][7] == "**53.34**"
    latex = ruler_table(df, 1024, "latex")
    assert "\\textbf{66.67}" in latex and latex.startswith("\\begin{tabular}")
    csv = ruler_table(df, 1024, "csv")
    assert "**" not in csv and csv.splitlines()[0] == "Model,Query,Budget,Method,KV MiB,S1,VT,Avg."
    mean = [[c.strip() for c in line.split("|")[1:-1]] for line in ruler_table(df).splitlines()[2:]]
    assert mean[0][5:] == ["95.00", "70.00", "82.50"]  # mean over the lengths each run has
    with pytest.raises(KvbenchError, match="no RULER results"):
        ruler_table(df, 4096)


def test_write_report_tables_and_figures(results, tmp_path):
    out = tmp_path / "report"
    written = write_ruler_report(results, out, echo=False)
    names = {p.name for p in written}
    assert {"ruler_1024.md", "ruler_2048.tex", "ruler_mean.csv", "ruler_score_vs_length.png",
            "ruler_score_vs_budget.pdf"} <= names
    assert all(p.stat().st_size > 0 for p in written)
    assert write_ruler_report(results / "needle_run", tmp_path / "other", echo=False) == []


def test_single_compressed_row_is_not_bold(tmp_path):
    _run(tmp_path, "fullkv", 128, {1024: {"niah_single_1": 100.0}})
    _run(tmp_path, "snapkv", 128, {1024: {"niah_single_1": 0.0}})
    assert "**" not in ruler_table(collect_ruler(tmp_path), 1024)


def test_bold_is_per_budget_and_names_come_from_the_method_registry(tmp_path):
    for budget, s1 in ((64, {"snapkv": 90.0, "adakv_pyramid": 10.0}), (128, {"snapkv": 50.0, "adakv_pyramid": 60.0})):
        for method, score in s1.items():
            _run(tmp_path, method, budget, {1024: {"niah_single_1": score}})
    rows = [[c.strip() for c in line.split("|")[1:-1]]
            for line in ruler_table(collect_ruler(tmp_path), 1024).splitlines()[2:]]
    assert [r[2:4] + r[5:6] for r in rows] == [["64", "SnapKV", "**90.00**"], ["64", "Ada-PyramidKV", "10.00"],
                                               ["128", "SnapKV", "50.00"], ["128", "Ada-PyramidKV", "**60.00**"]]
