"""RULER through the one report stack: collect gives one row per (run, length, task) with CIs from
sample_scores.jsonl; the tables (per length and over lengths) have the LongBench tables' bold + dagger, CIs, n and
Status; the query mode is a column; `python -m kvbench.report` writes them (RULER has no report module of its own)."""
from __future__ import annotations

import json

import pytest

from kvbench.errors import KvbenchError
from kvbench.report import collect
from kvbench.report.tables import benchmark_table
from kvbench.sample_rows import sample_row, write_sample_scores

SAMPLES = 3


def _run(root, method, budget, lengths, query="aware", status="complete"):
    """A RULER run folder as the pipeline writes it; each (length, task) has SAMPLES per-sample scores (0/1) whose
    mean is the given score (a multiple of 100/3)."""
    folder = root / "m" / "ruler" / f"{method}_{budget}_{query}"
    (folder / "predictions").mkdir(parents=True)
    run = {"model": {"name": "m"}, "benchmark": "ruler", "protocol": "ruler", "status": status,
           "method": {"name": method, "budget": None if method == "fullkv" else budget},
           "config": {"benchmark": {"query": query}}}
    (folder / "run.json").write_text(json.dumps(run))
    rows, by_length = [], {}
    for length, tasks in lengths.items():
        for task, score in tasks.items():
            hits = round(score * SAMPLES / 100)
            rows += [sample_row(task, f"{length}_{i}", float(i < hits), context_length=length) for i in range(SAMPLES)]
        by_length[str(length)] = {"tasks": {t: round(round(s * SAMPLES / 100) * 100 / SAMPLES, 2)
                                            for t, s in tasks.items()}, "n": {t: SAMPLES for t in tasks}}
    write_sample_scores(folder, rows)
    for task in {t for tasks in lengths.values() for t in tasks}:
        (folder / "predictions" / f"{task}.jsonl").write_text(json.dumps({"kv_bytes": 1024}) + "\n")
    (folder / "scores.json").write_text(json.dumps({"benchmark": "ruler", "query": query, "lengths": by_length}))
    return folder


@pytest.fixture()
def results(tmp_path):
    _run(tmp_path, "fullkv", 128, {1024: {"niah_single_1": 100.0, "vt": 100.0}, 2048: {"niah_single_1": 100.0,
                                                                                       "vt": 66.67}})
    _run(tmp_path, "snapkv", 128, {1024: {"niah_single_1": 66.67, "vt": 33.33}, 2048: {"niah_single_1": 33.33,
                                                                                       "vt": 0.0}})
    _run(tmp_path, "dynamickv", 128, {1024: {"niah_single_1": 33.33, "vt": 66.67},
                                      2048: {"niah_single_1": 33.33, "vt": 33.33}})
    _run(tmp_path, "snapkv", 64, {1024: {"niah_single_1": 0.0, "vt": 0.0}})
    return tmp_path


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not set(line) <= set("|:- ")]


def test_collect_gives_a_row_per_length_and_task_with_cis(results):
    df = collect(results)
    ruler = df[df["benchmark"] == "ruler"]
    assert len(ruler) == 14 and set(ruler["length"]) == {1024, 2048}
    row = ruler[(ruler["method"] == "SnapKV") & (ruler["budget"] == 128) & (ruler["length"] == 1024)
                & (ruler["task"] == "niah_single_1")].iloc[0]
    assert row["score"] == 66.67 and row["n"] == 3 and row["samples_ok"]
    assert row["ci_low"] == 0.0 and row["ci_high"] == 100.0  # 3 samples (1, 1, 0): the bootstrap spans all
    assert ruler.loc[ruler["method"] == "FullKV", "budget"].isna().all()


def test_table_per_length_has_the_common_layout(results):
    text = benchmark_table(collect(results), "ruler", length=1024, ci="pm")
    rows = _rows(text)
    assert rows[1] == ["Model", "Decode", "Budget", "Method", "KV MiB", "n", "S1", "VT", "Avg."]  # categories, header
    assert [r[1:4] for r in rows[2:]] == [["prefill", "Full", "FullKV"], ["prefill", "64", "SnapKV"],
                                          ["prefill", "128", "SnapKV"], ["prefill", "", "DynamicKV"]]
    assert rows[2][6].startswith("100.00") and "**" not in rows[2][6]  # FullKV is the reference, never bold
    # SnapKV and DynamicKV at 128: 3 samples cannot show a difference, so every bold cell has its dagger.
    assert rows[4][6].startswith("**66.67 ± ") and rows[4][6].endswith("**†")
    assert rows[5][7].startswith("**66.67 ± ") and rows[5][7].endswith("**†")
    assert rows[4][5] == "3" and "Note: " in text and "†: not significantly better" in text
    with pytest.raises(KvbenchError, match="no ruler results at length 4096"):
        benchmark_table(collect(results), "ruler", length=4096)


def test_mean_over_lengths_and_query_mode_as_a_column(results):
    _run(results, "snapkv", 128, {1024: {"niah_single_1": 0.0, "vt": 0.0}}, query="agnostic", status="running")
    text = benchmark_table(collect(results), "ruler")
    rows = _rows(text)
    assert rows[1][:4] == ["Model", "Query", "Decode", "Budget"] and "Status" in rows[1]
    body = {(r[rows[1].index("Query")], r[rows[1].index("Method")], r[rows[1].index("Budget")] or "128"): r
            for r in rows[2:] if r[rows[1].index("Method")]}
    full = body[("aware", "FullKV", "Full")]
    assert full[rows[1].index("S1")] == "100.00" and full[rows[1].index("VT")] == "83.34"  # mean of the 2 lengths
    assert full[rows[1].index("n")] == "6"  # samples over both lengths
    agnostic = body[("agnostic", "SnapKV", "128")]
    assert agnostic[rows[1].index("Status")] == "running" and "**" not in "".join(agnostic)  # alone in its mode
    assert "mean over its context lengths" in text


def test_cli_writes_ruler_tables_figures_and_html(results, tmp_path, capsys):
    from kvbench.report.__main__ import main

    out = tmp_path / "out"
    assert main([str(results), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"ruler_1024.md", "ruler_2048.tex", "ruler_mean.csv", "ruler_1024_relative.md", "ruler_score_vs_length.png",
            "ruler_score_vs_budget.pdf", "report.html"} <= names
