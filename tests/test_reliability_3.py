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
from kvbench.sample_rows import SAMPLE_SCORES_FILE, read_sample_scores
from kvbench.sample_scores import backfill
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


def test_a_sweep_of_ratios_is_named_after_them_and_never_mixed_with_budget(tmp_path):
    from kvbench.sweep import SweepError, plan
    _, jobs = plan(overrides(tmp_path, "method=knorm,tova", "method.compression_ratio=0.5,0.96875"))
    assert sorted(j.out.name for j in jobs) == ["knorm_ratio0.5", "knorm_ratio0.96875", "tova_ratio0.5",
                                                "tova_ratio0.96875"]
    with pytest.raises(SweepError, match="both set the KV size"):
        plan(overrides(tmp_path, "method=knorm", "budget=64,128", "method.compression_ratio=0.5"))


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
@pytest.mark.parametrize("setting, message", [("method.floor_alpha=abc", "method.floor_alpha=abc: expected a (finite )?number"),
                                              ("method.window_size=abc", "method.window_size=abc: expected an int")])
def test_adakv_family_settings_are_type_checked(tmp_path, no_model, method, setting, message):
    with pytest.raises(KvbenchError, match=message):
        evaluate(compose(overrides(tmp_path, f"method={method}", setting)))


# ---- item 4: a row-level schema check of kvpress-format RULER files

def _kvpress_row(**change):
    row = {"context": "Some text. One of the special magic numbers for a-b is: 1234567.\n",
           "question": "What is the special magic number for a-b? ", "answer_prefix": "The number is",
           "answer": ["1234567"], "task": "niah_single_1", "max_new_tokens": 128}
    return {**row, **change}


@pytest.mark.parametrize("line, message", [
    (json.dumps(_kvpress_row(answer={"a": 1})), "row 1: answer must be a text or a non-empty list of texts"),
    (json.dumps(_kvpress_row(answer=None)), "row 1: answer must be a text"),
    (json.dumps(_kvpress_row(max_new_tokens=0)), "row 1: max_new_tokens must be a positive integer, got 0"),
    (json.dumps(_kvpress_row(max_new_tokens=-5)), "row 1: max_new_tokens must be a positive integer, got -5"),
    (json.dumps(_kvpress_row(max_new_tokens=None)), "row 1: max_new_tokens must be a positive integer, got None"),
    (json.dumps(_kvpress_row(max_new_tokens=float("nan"))), "row 1: max_new_tokens must be a positive integer"),
    (json.dumps(_kvpress_row(max_new_tokens="abc")), "row 1: max_new_tokens must be a positive integer, got 'abc'"),
    (json.dumps(_kvpress_row(max_new_tokens=2.5)), "row 1: max_new_tokens must be a positive integer, got 2.5"),
    (json.dumps(_kvpress_row(context=None)), "row 1: context must be text"),
    ('["not", "an", "object"]', "row 1: expected a JSON object"),
])
def test_malformed_kvpress_rows_are_one_line_errors_naming_file_row_and_field(tmp_path, line, message):
    from kvbench.ruler.data import read_kvpress
    (tmp_path / "x.jsonl").write_text(line + "\n")
    with pytest.raises(KvbenchError, match=message) as caught:
        read_kvpress(tmp_path, 1024)
    assert "\n" not in str(caught.value) and "x.jsonl" in str(caught.value)


# ---- item 5: labels

def _ruler(tmp_path, *extra):
    return compose(["benchmark=ruler", "model=tiny_llama", "benchmark.lengths=[1024]", "benchmark.samples=1",
                    "benchmark.tasks=[niah_single_1]", f"results_root={tmp_path}", "progress=false", *extra])


def test_kvpress_files_held_directly_must_measure_about_the_length_asked(tmp_path, no_model):
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.jsonl").write_text(json.dumps(_kvpress_row(context="Some words in a row. " * 170)) + "\n")
    with pytest.raises(KvbenchError, match=r"holds its files directly and their prompts average \d+ tokens, not "
                                           r"about benchmark.lengths=\[512\]"):
        prepare(_ruler(tmp_path, f"benchmark.data_dir={data}", "benchmark.lengths=[512]"))
    assert prepare(_ruler(tmp_path, f"benchmark.data_dir={data}", "benchmark.lengths=[1024]"))
    named = tmp_path / "512"  # a folder named after its length says what the data is
    data.rename(named)
    assert prepare(_ruler(tmp_path, f"benchmark.data_dir={named}", "benchmark.lengths=[512]"))


def test_a_ruler_task_listed_twice_is_refused(tmp_path, no_model):
    with pytest.raises(KvbenchError, match="benchmark.tasks lists niah_single_1 more than once"):
        prepare(_ruler(tmp_path, "benchmark.tasks=[niah_single_1,niah_single_1]"))


def test_agnostic_and_multi_needle_runs_say_so_in_record_summary_and_report(tmp_path, capsys):
    from kvbench.pipeline import run_record
    from kvbench.report.__main__ import _benchmark_sections
    from kvbench.summary import print_summary

    job = prepare(compose(overrides(tmp_path, "method=snapkv", "benchmark.query=agnostic")))
    assert run_record(job)["protocol"] == "dynamickv_agnostic"
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("The sky was grey over the harbour. Boats came in slowly. " * 60)
    cfg = compose(["model=tiny_llama", "benchmark=needle", f"benchmark.haystack_dir={hay}", "method=snapkv",
                   "budget=64", f"results_root={tmp_path}", "progress=false", "benchmark.grid.start=400",
                   "benchmark.grid.end=400", "benchmark.grid.depths=2", "benchmark.multi_needle=true",
                   "benchmark.query=agnostic"])
    print_summary(cfg, evaluate(cfg))
    assert "| multi-needle | query=agnostic" in capsys.readouterr().out
    assert json.loads((output_dir(cfg) / "run.json").read_text())["protocol"] == "needle_raw_agnostic_multineedle"
    df = collect([tmp_path / "tiny_llama" / "needle"])
    # The query mode and the variant are columns; the protocol name drops the suffixes that repeat them.
    assert list(df["query"]) == ["agnostic"] and list(df["protocol"]) == ["needle_raw"]
    assert list(df["variant"]) == ["multi-needle"]
    _benchmark_sections(df, tmp_path / "report", [])
    rows = table_rows((tmp_path / "report" / "needle.md").read_text(), kv=True)
    assert rows[1][rows[0].index("Needles")] == "multi" and rows[1][rows[0].index("Method")] == "SnapKV"
    assert rows[1][rows[0].index("Query")] == "agnostic"


# ---- item 11: sweeps and numbers that were truncated

@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_a_sweep_over_methods_takes_method_settings(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvbench.sweep", "run", *overrides(
        tmp_path, "method=snapkv,streamingllm", "method.window_size=8", "budget=16", "benchmark.limit=1",
        f"hydra.sweep.dir={tmp_path / 'multirun'}")], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("snapkv_16", "streamingllm_16"):
        run = json.loads((tmp_path / "tiny_llama" / "longbench" / name / "run.json").read_text())
        assert run["method"]["window_size"] == 8 and run["status"] == "complete"
    from kvbench.sweep import plan  # other method settings into those folders: a conflict, never "done"
    _, jobs = plan(overrides(tmp_path, "method=snapkv,streamingllm", "method.window_size=4", "budget=16",
                             "benchmark.limit=1"))
    assert [j.status for j in jobs] == ["conflict", "conflict"] and "window_size" in jobs[0].note


@pytest.mark.parametrize("extra, message", [
    ("benchmark.samples=2.5", "benchmark.samples=2.5: give a positive integer"),
    ("benchmark.samples=true", "benchmark.samples=True: give a positive integer"),
    ("benchmark.lengths=[1024.5]", "benchmark.lengths=.*give a list of integers"),
])
def test_ruler_counts_are_never_truncated(tmp_path, no_model, extra, message):
    with pytest.raises(KvbenchError, match=message):
        prepare(_ruler(tmp_path, extra))


def test_needle_depths_beyond_whole_percents_are_refused(tmp_path, no_model):
    with pytest.raises(KvbenchError, match="benchmark.grid.depths=150: at most 101"):
        prepare(compose(["model=tiny_llama", "benchmark=needle", "benchmark.grid.depths=150",
                         f"results_root={tmp_path}"]))


def test_compare_refuses_a_confidence_outside_0_1(tmp_path, capsys):
    from kvbench.compare import main
    for run in ("a", "b"):
        write_run(tmp_path / run, MODEL, "snapkv", 128, {"qasper": 50.0})
    dirs = [str(tmp_path / run / MODEL["name"] / "longbench" / "snapkv_128") for run in ("a", "b")]
    assert main([*dirs, "--confidence", "1.5"]) == 2
    assert "confidence=1.5: give a level between 0 and 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["snapkv", "adakv", "h2o", "pyramidkv", "streamingllm"])
def test_a_method_without_a_ratio_rule_takes_the_ratio_as_the_fraction_budget(tmp_path, name):
    from kvbench.methods import method_from_config

    asked = prepare(compose(overrides(tmp_path, f"method={name}", "++method.compression_ratio=0.875")))
    fraction = prepare(compose(overrides(tmp_path, f"method={name}", "budget=0.125")))
    assert asked.out.name == f"{name}_ratio0.875" and fraction.out.name == f"{name}_0.125"
    assert asked.method.budget == 0.125 and asked.method.params()["compression_ratio"] == 0.875
    assert {k: v for k, v in asked.method.params().items() if k != "compression_ratio"} == fraction.method.params()
    for n in (1000, 1100, 4096):  # round(n * (1 - r)), window included, as the fraction budget
        assert asked.method.resolve_budget(n) == fraction.method.resolve_budget(n) == \
            max(asked.method.window_size + 1, round(n * 0.125))
    with pytest.raises(KvbenchError, match="ratio 0 is method=fullkv"):
        method_from_config({"name": name, "compression_ratio": 0})


def test_fullkv_ignores_a_ratio_as_it_ignores_a_budget(tmp_path):
    job = prepare(compose(overrides(tmp_path, "method=fullkv", "++method.compression_ratio=0.5")))
    assert job.out.name == "fullkv" and "compression_ratio" not in job.method.params()
    _, jobs = __import__("kvbench.sweep", fromlist=["plan"]).plan(
        overrides(tmp_path, "method=fullkv,snapkv,keydiff", "method.compression_ratio=0.5,0.875"))
    assert sorted({j.out.name for j in jobs}) == ["fullkv", "keydiff_ratio0.5", "keydiff_ratio0.875",
                                                  "snapkv_ratio0.5", "snapkv_ratio0.875"]
