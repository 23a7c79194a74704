"""Session and cost reports (kvbench.report.sessions): the score per turn of session runs, and every run's score
against its mean generated length and peak KV bytes, each row saying when the method compressed."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from kvbench.report.sessions import (cost_frame, cost_markdown, decode_label, session_frame, session_markdown,
                                     write_cost_report, write_session_report)


def session_run(root, name, method, answers="gold", decode=None, scores=((1, 1, 0), (0, 1, 0))):
    """A run folder: sessions of len(scores[0]) turns, `scores[s][t]` the score of session s at turn t + 1."""
    folder = root / name
    (folder / "predictions").mkdir(parents=True)
    run = {"benchmark": "needle", "model": {"name": "m"},
           "method": {"name": method, "budget": 64, **({"decode_interval": decode} if decode else {})},
           "config": {"method": {"budget_agnostic": method == "fullkv"}},
           "settings": {"benchmark": {"session": True, "session_answers": answers}}}
    (folder / "run.json").write_text(json.dumps(run))
    lines = [{"cell": f"{s}_{t}", "turn": t + 1, "score": float(v), "retrieval": float(v), "new_tokens": 10 + t,
              "peak_kv_bytes": 2 ** 20 * (t + 1)} for s, row in enumerate(scores) for t, v in enumerate(row)]
    (folder / "predictions" / "needle.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_session_frame_scores_each_turn_over_the_sessions(tmp_path):
    session_run(tmp_path, "a", "snapkv", scores=((1, 1, 0), (0, 1, 0)))
    session_run(tmp_path, "b", "snapkv", answers="model", decode=8, scores=((1, 0, 0), (1, 0, 1)))
    frame = session_frame(tmp_path)
    gold = frame[frame["answers"] == "gold"]
    assert list(gold["turn"]) == [1, 2, 3] and list(gold["score"]) == [50.0, 100.0, 0.0]
    assert list(gold["n"]) == [2, 2, 2] and list(gold["peak_kv_mib"]) == [1.0, 2.0, 3.0]
    model = frame[frame["answers"] == "model"]
    assert list(model["score"]) == [100.0, 0.0, 50.0] and set(model["decode"]) == {"every 8"}
    text = session_markdown(frame)
    assert "| Turn 1 | Turn 2 | Turn 3 | n |" in text
    assert "| m | needle | SnapKV | 64 | gold | prefill | 50.0 [0.0, 100.0] | 100.0 [100.0, 100.0] |" in text
    written = write_session_report(tmp_path, tmp_path / "out")
    assert {p.name for p in written} >= {"sessions.md", "sessions.csv", "session_turns.png"}


def test_runs_without_sessions_give_no_session_report(tmp_path):
    folder = session_run(tmp_path, "a", "snapkv")
    run = json.loads((folder / "run.json").read_text())
    run["settings"]["benchmark"] = {}
    (folder / "run.json").write_text(json.dumps(run))
    assert session_frame(tmp_path).empty and write_session_report(tmp_path, tmp_path / "out") == []


def test_cost_frame_averages_each_run_and_names_its_decode_setting():
    rows = [{"model": "m", "benchmark": "ruler", "method": "SnapKV", "budget": 64.0, "query": "aware", "variant": "",
             "decode_interval": d, "run_dir": f"r{d}", "score": s, "new_tokens_mean": n, "peak_kv_bytes_mean": 2 ** 21}
            for d, s, n in ((0, 40.0, 10.0), (0, 60.0, 30.0), (16, 50.0, 12.0))]
    frame = cost_frame(pd.DataFrame(rows))
    assert list(frame["decode"]) == ["prefill", "every 16"]
    assert list(frame["score"]) == [50.0, 50.0] and list(frame["new_tokens"]) == [20.0, 12.0]
    assert list(frame["peak_kv_mib"]) == [2.0, 2.0]
    assert "| prefill | 50.00 | 20.0 | 2 | 2 |" in cost_markdown(frame)
    assert decode_label(None) == "prefill" and decode_label(float("nan")) == "prefill"


def test_the_session_table_marks_a_budget_held_at_the_methods_minimum(tmp_path):
    folder = session_run(tmp_path, "a", "snapkv")
    path = folder / "predictions" / "needle.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "budget_tokens": 33, **({"budget_asked": 20, "budget_clamped": True}
                                                                      if r["turn"] == 1 else {})}) + "\n" for r in lines))
    session_run(tmp_path, "b", "h2o")
    write_session_report(tmp_path, tmp_path / "out")
    text = (tmp_path / "out" / "sessions.md").read_text()
    assert "| m | needle | SnapKV | 64‡ | gold |" in text and "| m | needle | H2O | 64 | gold |" in text
    assert "SnapKV 64 (m, needle, gold answers): 33 tokens on 2 of 6 samples." in text


def test_the_cost_table_marks_a_budget_held_at_the_methods_minimum(tmp_path):
    rows = [{"model": "m", "benchmark": "needle", "method": "SnapKV", "budget": b, "query": "aware", "variant": "",
             "decode_interval": 0, "run_dir": f"r{b}", "score": 50.0, "new_tokens_mean": 10.0,
             "peak_kv_bytes_mean": 2 ** 21, "budget_clamped_n": c, "budget_lines_n": 4, "budget_held": h}
            for b, c, h in ((0.03125, 3, "33"), (0.5, 0, ""))]
    written = write_cost_report(pd.DataFrame(rows), tmp_path)
    text = (tmp_path / "cost.md").read_text()
    assert "| SnapKV | 0.03125‡ | prefill |" in text and "| SnapKV | 0.5 | prefill |" in text
    assert "SnapKV 0.03125 (m, needle): 33 tokens on 3 of 4 samples." in text and written


@pytest.mark.parametrize("bad", [None])
def test_cost_frame_of_no_scores_is_empty(bad):
    assert cost_frame(pd.DataFrame({"score": [bad], "peak_kv_bytes_mean": [1.0]})).empty


def test_runs_asked_with_a_compression_ratio_are_labelled_by_it_in_the_cost_and_session_tables(tmp_path):
    rows = [{"model": "m", "benchmark": "needle", "method": "KeyDiff", "budget": math.nan, "compression_ratio": r,
             "query": "agnostic", "variant": "", "decode_interval": 0, "run_dir": f"r{r}", "score": 50.0,
             "new_tokens_mean": 10.0, "peak_kv_bytes_mean": 2 ** 20} for r in (0.875, 0.5)]
    rows.append({**rows[0], "method": "FullKV", "compression_ratio": math.nan, "run_dir": "full"})
    frame = cost_frame(pd.DataFrame(rows))
    assert list(frame["budget"]) == ["Full", "ratio 0.5", "ratio 0.875"]  # never 'Full' for a ratio run
    assert "| KeyDiff | ratio 0.875 | prefill |" in cost_markdown(frame)
    folder = session_run(tmp_path, "k", "knorm")
    run = json.loads((folder / "run.json").read_text())
    run["method"] = {"name": "knorm", "budget": None, "compression_ratio": 0.75}
    (folder / "run.json").write_text(json.dumps(run))
    assert set(session_frame(tmp_path)["budget"]) == {"ratio 0.75"}
