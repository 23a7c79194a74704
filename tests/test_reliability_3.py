"""Issue 25 (third reliability pass) and issue 24 item 3 (runs asked with a compression ratio): each test fails on
the main branch before the fix."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from conftest import REPO, SHARED_LONGBENCH
from kvbench.config import compose, output_dir
from kvbench.errors import KvbenchError
from kvbench.pipeline import evaluate, prepare
from kvbench.report import ReportWarning, collect, longbench_table
from kvbench.sample_scores import SAMPLE_SCORES_FILE, backfill, read_sample_scores
from test_pipeline import ONE_THREAD, TASK, no_model, overrides  # noqa: F401  (no_model is a fixture)
from test_report import MODEL, table_rows, write_run


# ---- item 1 / issue 24 item 3: compression_ratio names the run; refused with budget= or when it keeps 0 tokens

def test_a_compression_ratio_names_the_run_and_replaces_the_budget(tmp_path):
    job = prepare(compose(overrides(tmp_path, "method=knorm", "budget=16", "method.compression_ratio=0.875")))
    assert job.out.name == "knorm_ratio0.875" and job.method.budget is None
    assert job.method.resolve_budget(1000) == 125  # kvpress's int(n * (1 - r))
    assert prepare(compose(overrides(tmp_path, "method=knorm", "method.compression_ratio=0"))).out.name == \
        "knorm_ratio0"


def test_a_ratio_that_keeps_no_token_is_refused_before_the_model_loads(tmp_path, no_model):
    cfg = compose(overrides(tmp_path, "method=knorm", "method.compression_ratio=0.9999"))
    with pytest.raises(KvbenchError, match=r"compression_ratio=0.9999 keeps 0 of the 1024 tokens"):
        evaluate(cfg)
    method = prepare(compose(overrides(tmp_path, "method=knorm", "method.compression_ratio=0.99"))).method
    with pytest.raises(KvbenchError, match="keeps 0 of this prompt's 50 tokens"):  # a shorter prompt, at run time
        method.resolve_budget(50)


def test_budget_and_compression_ratio_together_are_refused_on_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", *overrides(tmp_path, "method=knorm", "budget=16",
                                                                "method.compression_ratio=0.5")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "budget=16 and method.compression_ratio=0.5 both set the KV size" in proc.stdout + proc.stderr


def test_a_ratio_run_is_reported_under_its_ratio_with_the_kv_bytes_held(tmp_path):
    cfg = compose(overrides(tmp_path, "method=knorm", "method.compression_ratio=0.75", "benchmark.limit=1"))
    evaluate(cfg)
    evaluate(compose(overrides(tmp_path, "method=knorm", "budget=64", "benchmark.limit=1")))
    df = collect([tmp_path])
    rows = table_rows(longbench_table(df, language="zh"), kv=True)
    header = rows[1]
    budget, kv = header.index("Budget"), header.index("KV MiB")
    assert kv == budget + 2  # Budget | Method | KV MiB
    cells = {r[budget]: r[kv] for r in rows[2:]}
    assert set(cells) == {"64", "ratio 0.75"}
    held = json.loads((output_dir(cfg) / "run.json").read_text())["kv_bytes_mean"]
    assert cells["ratio 0.75"] == f"{held / 2 ** 20:.3g}" and held > 0


# ---- item 2: sample_scores backfills the recorded selection only

def test_backfill_refuses_predictions_outside_the_recorded_selection(tmp_path):
    evaluate(compose(overrides(tmp_path, "method=fullkv", "benchmark.limit=3")))
    cfg = compose(overrides(tmp_path, "method=fullkv", "benchmark.limit=1"))
    evaluate(cfg)
    run_dir = output_dir(cfg)
    assert len(read_sample_scores(run_dir)) == 1
    (run_dir / SAMPLE_SCORES_FILE).unlink()
    with pytest.raises(KvbenchError, match=r"hold 3 scored samples of .* but scores.json covers 1"):
        backfill(run_dir)
    assert not (run_dir / SAMPLE_SCORES_FILE).exists()
    evaluate(compose(overrides(tmp_path, "method=fullkv", "benchmark.limit=3")))  # the selection covers all again
    (run_dir / SAMPLE_SCORES_FILE).unlink()
    backfill(run_dir)
    assert len(read_sample_scores(run_dir)) == 3


# ---- item 3: a report row joins runs of equal settings only; the collision warning is printed once

def _with_fingerprint(run_dir, fingerprint):
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**run, "fingerprint": fingerprint}))


def test_runs_of_other_settings_never_share_a_row(tmp_path):
    a = write_run(tmp_path / "r1", MODEL, "snapkv", 128, {"narrativeqa": 10.0})
    b = write_run(tmp_path / "r2", MODEL, "snapkv", 128, {"hotpotqa": 30.0})
    _with_fingerprint(a, "len256-seed42")
    _with_fingerprint(b, "len1024-seed7")
    with pytest.warns(ReportWarning, match="collision: 2 runs of different settings give SnapKV budget 128"):
        rows = table_rows(longbench_table(collect([tmp_path])))
    snap = [r for r in rows[2:] if "SnapKV" in r]
    assert len(snap) == 2 and {r[1] for r in snap} == {"r1/llama3-8b-instruct/longbench/snapkv_128",
                                                        "r2/llama3-8b-instruct/longbench/snapkv_128"}
    assert all(r[-1] == "-" for r in snap)  # each row misses a task: no average over two settings
    _with_fingerprint(b, "len256-seed42")  # the same settings, tasks split over two folders: one row
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportWarning)
        rows = table_rows(longbench_table(collect([tmp_path])))
    assert [r[-4:] for r in rows[2:]] == [["2", "10.00", "30.00", "20.00"]]


def test_report_cli_prints_a_collision_once(tmp_path, capsys):
    from kvbench.report.__main__ import main
    for root, fingerprint, task in (("r1", "x", "narrativeqa"), ("r2", "y", "hotpotqa")):
        _with_fingerprint(write_run(tmp_path / root, MODEL, "snapkv", 128, {task: 10.0}), fingerprint)
    assert main([str(tmp_path), "--out", str(tmp_path / "report"), "--format", "md"]) == 0
    assert capsys.readouterr().err.count("collision") == 1


# ---- item 7: the adakv family is type-checked through the registry

@pytest.mark.parametrize("method", ["adakv", "adakv_pyramid_gqa"])
@pytest.mark.parametrize("setting, message", [("method.floor_alpha=abc", "method.floor_alpha=abc: expected a number"),
                                              ("method.window_size=abc", "method.window_size=abc: expected an int")])
def test_adakv_family_settings_are_type_checked(tmp_path, no_model, method, setting, message):
    with pytest.raises(KvbenchError, match=message):
        evaluate(compose(overrides(tmp_path, f"method={method}", setting)))
