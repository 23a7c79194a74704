"""Tests of kvbench.compare and the sample_scores.jsonl format."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvbench.compare import compare_runs, main
from kvbench.errors import KvbenchError
from kvbench.sample_rows import (SAMPLE_SCORES_FILE, pop_and_write, read_sample_scores, sample_row,
                                   write_sample_scores)
from kvbench.sample_scores import backfill


def make_run(root: Path, name: str, scores: dict[str, list[float]], ids=None, benchmark="longbench") -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    method, _, budget = name.partition("_")
    (run_dir / "run.json").write_text(json.dumps({"model": {"name": "m"}, "benchmark": benchmark, "status": "complete",
                                                  "method": {"name": method, "budget": int(budget) if budget else None}}))
    rows = [sample_row(task, (ids or {}).get(task, [f"{task}-{i}" for i in range(len(v))])[i], s)
            for task, v in scores.items() for i, s in enumerate(v)]
    write_sample_scores(run_dir, rows)
    return run_dir


def test_sample_scores_round_trip_and_pipeline_hook(tmp_path):
    scores = {"benchmark": "needle", "n": 2, "sample_scores": [sample_row("needle", "1000_0", 1.0, depth_percent=0),
                                                               sample_row("needle", "1000_50", 0.5, depth_percent=50)]}
    assert pop_and_write(tmp_path, scores) == {"benchmark": "needle", "n": 2}       # kept out of scores.json
    frame = read_sample_scores(tmp_path)
    assert list(frame["id"]) == ["1000_0", "1000_50"] and list(frame["score"]) == [1.0, 0.5]
    assert list(frame["depth_percent"]) == [0, 50]
    (tmp_path / SAMPLE_SCORES_FILE).write_text(json.dumps(sample_row("t", "a", 1.0)) * 1 + "\n"
                                               + json.dumps(sample_row("t", "a", 0.0)) + "\n")
    with pytest.raises(KvbenchError, match="'a' of task 't' appears twice"):
        read_sample_scores(tmp_path)
    with pytest.raises(KvbenchError, match="python -m kvbench.sample_scores"):
        read_sample_scores(tmp_path / "elsewhere")


def test_longbench_scoring_returns_the_per_sample_vector_its_score_averages(tmp_path):
    from kvbench.longbench.scoring import score_folder
    preds = tmp_path / "run" / "predictions"
    preds.mkdir(parents=True)
    lines = [{"pred": "Paris", "answers": ["Paris"], "_id": "x1", "length": 100},
             {"pred": "Rome", "answers": ["Paris"], "_id": "x2", "length": 5000},
             {"pred": "the Paris", "answers": ["Paris"], "_id": "x3", "length": 9000}]
    (preds / "hotpotqa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = score_folder(preds)
    rows = summary["sample_scores"]
    assert [r["id"] for r in rows] == ["x1", "x2", "x3"] and [r["task"] for r in rows] == ["hotpotqa"] * 3
    assert round(100 * np.mean([r["score"] for r in rows]), 2) == summary["tasks"]["hotpotqa"]
    (preds / "hotpotqa.jsonl").rename(preds / "hotpotqa_e.jsonl")
    rows_e = score_folder(preds)["sample_scores"]
    assert [r["bucket"] for r in rows_e] == ["0-4k", "4-8k", "8k+"] and rows_e[0]["task"] == "hotpotqa"
    (tmp_path / "run" / "run.json").write_text(json.dumps({"benchmark": "longbench_e"}))
    backfill(tmp_path / "run")                                   # runs made before the file existed
    assert list(read_sample_scores(tmp_path / "run")["bucket"]) == ["0-4k", "4-8k", "8k+"]


def test_needle_summary_carries_one_sample_per_cell():
    from kvbench.needle.runner import summarize_needle
    records = [{"cell": "1000_0", "context_length": 1000, "depth_percent": 0, "score": 1.0, "score_rouge": 10.0},
               {"cell": "1000_100", "context_length": 1000, "depth_percent": 100, "score": 0.0, "score_rouge": 0.0}]
    rows = summarize_needle(records)["sample_scores"]
    assert [(r["task"], r["id"], r["score"]) for r in rows] == [("needle", "1000_0", 1.0), ("needle", "1000_100", 0.0)]


def test_compare_runs_gives_diff_ci_and_p_per_task_and_average(tmp_path):
    rng = np.random.default_rng(0)
    base = {"qasper": rng.random(60), "lcc": rng.random(40)}
    a = make_run(tmp_path, "snapkv_128", {t: list(np.clip(v + 0.2, 0, 1)) for t, v in base.items()})
    b = make_run(tmp_path, "dynamickv_128", {t: list(v) for t, v in base.items()})
    result = compare_runs(a, b, n_permutations=2000)
    qasper = result["tasks"]["qasper"]
    assert set(qasper) == {"mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "n"}
    assert qasper["n"] == 60 and qasper["mean_diff"] == pytest.approx(qasper["mean_a"] - qasper["mean_b"])
    assert 0 < qasper["ci_low"] < qasper["mean_diff"] < qasper["ci_high"] and qasper["p_value"] < 0.01
    average = result["average"]
    assert average["n"] == 100
    assert average["mean_diff"] == pytest.approx((qasper["mean_diff"] + result["tasks"]["lcc"]["mean_diff"]) / 2)
    same = compare_runs(b, b)["average"]
    assert same["mean_diff"] == 0 and same["p_value"] == 1.0 and same["ci_low"] == same["ci_high"] == 0


def test_compare_refuses_runs_on_different_samples(tmp_path, capsys):
    a = make_run(tmp_path, "snapkv_128", {"qasper": [1.0, 0.0, 1.0]})
    b = make_run(tmp_path, "h2o_128", {"qasper": [1.0, 0.0, 1.0]}, ids={"qasper": ["qasper-0", "qasper-1", "zz"]})
    c = make_run(tmp_path, "pyramidkv_128", {"qasper": [1.0, 0.0, 1.0], "lcc": [0.5]})
    with pytest.raises(KvbenchError, match=r"task 'qasper' has 1 sample id\(s\) only in .*snapkv_128 and 1 only in"):
        compare_runs(a, b)
    with pytest.raises(KvbenchError, match="task 'lcc' has no per-sample scores in .*snapkv_128"):
        compare_runs(a, c)
    assert main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot pair") and err.count("\n") == 1


def test_compare_cli_prints_and_writes_json(tmp_path, capsys):
    a = make_run(tmp_path, "snapkv_128", {"needle": [1.0, 1.0, 0.5, 1.0]}, benchmark="needle")
    b = make_run(tmp_path, "dynamickv_128", {"needle": [1.0, 0.5, 0.5, 0.0]}, benchmark="needle")
    out = tmp_path / "cmp.json"
    assert main([str(a), str(b), "--out", str(out), "--permutations", "500"]) == 0
    printed = capsys.readouterr().out
    assert "A = snapkv 128" in printed and "| Avg." in printed and "+37.50" in printed
    saved = json.loads(out.read_text())
    assert saved["average"]["mean_diff"] == 37.5 and saved["n_permutations"] == 500 and saved["a"]["method"] == "snapkv"


def test_pipeline_writes_sample_scores_that_compare_and_report_read(tmp_path):
    import torch
    from kvbench.config import compose, output_dir
    from kvbench.pipeline import evaluate
    from kvbench.report import collect
    torch.set_num_threads(1)
    data = tmp_path / "data"
    data.mkdir()
    examples = [{"input": f"段落{i}?", "context": "段落1：天空。段落2：大海。" * 40, "answers": [f"段落{i}"], "length": 300,
                 "all_classes": None, "_id": f"id{i}", "dataset": "passage_retrieval_zh", "language": "zh"}
                for i in (1, 2)]
    (data / "passage_retrieval_zh.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n"
                                                             for e in examples), encoding="utf-8")
    dirs = []
    for method in ("snapkv", "h2o"):
        cfg = compose(["model=tiny_llama", f"benchmark.data_dir={data}", "benchmark.verify_checksums=false",
                       "benchmark.tasks=[passage_retrieval_zh]", f"results_root={tmp_path / 'results'}",
                       "progress=false", f"method={method}", "budget=64"])
        scores = evaluate(cfg)
        dirs.append(output_dir(cfg))
        assert "sample_scores" not in scores
        assert "sample_scores" not in json.loads((dirs[-1] / "scores.json").read_text())
        samples = read_sample_scores(dirs[-1])
        assert len(samples) == 2 and set(samples["task"]) == {"passage_retrieval_zh"}
        assert round(100 * samples["score"].mean(), 2) == scores["tasks"]["passage_retrieval_zh"]
    result = compare_runs(*dirs)
    assert result["tasks"]["passage_retrieval_zh"]["n"] == 2
    assert set(read_sample_scores(dirs[0])["id"]) == {"id1", "id2"}
    df = collect([tmp_path / "results"])
    assert df["ci_low"].notna().all() and (df["ci_low"] <= df["score"]).all()


def test_sample_scores_cli_still_runs_as_a_module(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kvbench.sample_scores", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nowhere" in done.stderr and "Traceback" not in done.stderr
