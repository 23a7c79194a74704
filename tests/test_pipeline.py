"""The pipeline end to end on a tiny model and real LongBench data: results, resume, refusal to mix, clear errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SHARED_LONGBENCH
from kvbench.config import compose, output_dir
from kvbench.errors import KvbenchError
from kvbench.pipeline import evaluate, prepare
from kvbench.results import read_predictions

TASK = "passage_retrieval_zh"  # 32 new tokens: the quickest real task


def overrides(tmp_path, *extra):
    return ["model=tiny_llama", f"benchmark.data_dir={SHARED_LONGBENCH}", f"benchmark.tasks=[{TASK}]",
            f"results_root={tmp_path}", "progress=false", *extra]


def without_timings(record: dict) -> dict:
    return {k: v for k, v in record.items() if not k.endswith("_s")}


def test_run_writes_predictions_scores_and_record(tmp_path):
    cfg = compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=2"))
    scores = evaluate(cfg)
    out = output_dir(cfg)
    assert out == tmp_path / "tiny_llama" / "longbench" / "snapkv_64"
    lines = read_predictions(out / "predictions" / f"{TASK}.jsonl")
    assert len(lines) == 2 and {"pred", "answers", "all_classes", "length", "_id"} <= set(lines[0])
    assert lines[0]["layer_kept"] == [64] * 4 and lines[0]["kv_bytes"] == 64 * 4 * 4 * 16 * 2 * 4
    assert lines[0]["prompt_tokens"] <= 1030 and lines[0]["truncated"]
    assert scores["tasks"] == json.loads((out / "scores.json").read_text())["tasks"]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["protocol"] == "dynamickv"
    assert run["method"]["window_size"] == 32 and run["method"]["pooling"] == "avgpool"
    assert run["versions"]["torch"] and run["versions"]["transformers"] and run["peak_memory_bytes"] > 0
    assert run["timing"]["prefill_s_mean"] > 0 and run["kv_bytes_mean"] == lines[0]["kv_bytes"]
    assert run["config"]["budget"] == 64


def test_rerun_skips_done_samples_and_extends_with_a_larger_limit(tmp_path):
    cfg = compose(overrides(tmp_path, "method=streamingllm", "budget=64", "benchmark.limit=1"))
    evaluate(cfg)
    seen = []
    evaluate(compose(overrides(tmp_path, "method=streamingllm", "budget=64", "benchmark.limit=3")),
             on_sample=lambda task, rec: seen.append(rec["_id"]))
    lines = read_predictions(output_dir(cfg) / "predictions" / f"{TASK}.jsonl")
    assert len(seen) == 2 and len(lines) == 3 and len({r["_id"] for r in lines}) == 3


def test_rerun_with_other_settings_is_refused(tmp_path):
    evaluate(compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1")))
    with pytest.raises(KvbenchError, match="different settings.*window_size"):
        evaluate(compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1",
                                   "method.window_size=8")))


def test_torn_last_line_is_dropped_and_redone(tmp_path):
    cfg = compose(overrides(tmp_path, "method=fullkv", "benchmark.limit=2"))
    evaluate(cfg)
    path = output_dir(cfg) / "predictions" / f"{TASK}.jsonl"
    complete = path.read_bytes()
    first, second = complete.splitlines(keepends=True)
    path.write_bytes(first + second[: len(second) // 2])  # a crash in the middle of the second write
    with pytest.warns(UserWarning, match="incomplete last line"):
        evaluate(cfg)
    redone = read_predictions(path)
    assert path.read_bytes().endswith(b"\n") and len(redone) == 2
    assert [without_timings(r) for r in redone] == [without_timings(json.loads(x)) for x in (first, second)]


def test_corrupt_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path):
    cfg = compose(overrides(tmp_path, "method=fullkv", "benchmark.limit=2"))
    evaluate(cfg)
    path = output_dir(cfg) / "predictions" / f"{TASK}.jsonl"
    first, second = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"{broken\n" + second)
    with pytest.raises(KvbenchError, match=f"{TASK}.jsonl, line 1"):
        evaluate(cfg)


@pytest.mark.parametrize("extra, message", [
    (["method=nosuch"], "Could not find 'method/nosuch'"),
])
def test_unknown_config_choice_is_a_hydra_error(tmp_path, extra, message):
    with pytest.raises(Exception, match=message):
        compose(overrides(tmp_path, *extra))


@pytest.mark.parametrize("extra, message", [
    (["method=snapkv", "budget=32"], "budget=32 must be larger than method.window_size=32"),
    (["method=snapkv", "method.kernel_size=6"], "kernel_size=6 must be odd"),
    (["method=snapkv", "method.pooling=meanpool"], "choose avgpool or maxpool"),
    (["method=dynamickv", "method.mode=fast"], "choose one of official, fixed"),
    (["method=h2o", "method.cache_heads=both"], "per_query_head, per_kv_head"),
    (["benchmark.tasks=[nosuchtask]"], "unknown LongBench task 'nosuchtask'"),
    (["benchmark.data_dir=/no/such/folder"], "is not a folder"),
    (["protocol.eos=sometimes"], "eos"),
])
def test_bad_settings_fail_before_any_model_is_loaded(tmp_path, extra, message):
    started = time.perf_counter()
    with pytest.raises(KvbenchError, match=message):
        prepare(compose(overrides(tmp_path, *extra)))
    assert time.perf_counter() - started < 5


def test_cli_reports_errors_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", *overrides(tmp_path, "method=snapkv", "budget=16")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "budget=16 must be larger than method.window_size=32" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    args = [sys.executable, "run.py", *overrides(tmp_path, "method=dynamickv", "budget=64", "benchmark.limit=5")]
    pred = tmp_path / "tiny_llama" / "longbench" / "dynamickv_64" / "predictions" / f"{TASK}.jsonl"
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and (not pred.exists() or len(read_predictions(pred)) < 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = len(read_predictions(pred, repair=True))
    assert 2 <= interrupted < 5, "the run should have been killed part-way"
    assert subprocess.run(args, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    resumed = read_predictions(pred)
    assert len(resumed) == 5 and len({r["_id"] for r in resumed}) == 5
    # Same predictions as an uninterrupted run.
    fresh = tmp_path / "fresh"
    fresh_args = [a if not a.startswith("results_root=") else f"results_root={fresh}" for a in args]
    assert subprocess.run(fresh_args, cwd=REPO, capture_output=True, timeout=300).returncode == 0
    again = read_predictions(fresh / "tiny_llama" / "longbench" / "dynamickv_64" / "predictions" / f"{TASK}.jsonl")
    assert [(r["_id"], r["pred"]) for r in again] == [(r["_id"], r["pred"]) for r in resumed]


def test_needle_run_on_a_tiny_model_and_a_short_haystack(tmp_path):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("The sky was grey over the harbour. Boats came in slowly. " * 60)
    cfg = compose(["model=tiny_llama", "benchmark=needle", f"benchmark.haystack_dir={hay}", "method=snapkv",
                   "budget=64", f"results_root={tmp_path}", "progress=false", "benchmark.grid.start=400",
                   "benchmark.grid.end=600", "benchmark.grid.step=200", "benchmark.grid.depths=3"])
    scores = evaluate(cfg)
    lines = read_predictions(output_dir(cfg) / "predictions" / "needle.jsonl")
    assert scores["n"] == 6 and len(lines) == 6
    assert {(r["context_length"], r["depth_percent"]) for r in lines} == {(l, d) for l in (400, 600)
                                                                         for d in (0, 50, 100)}
    assert all(0 <= r["score"] <= 1 and r["layer_kept"] == [64] * 4 for r in lines)
    assert scores["mean_score"] == pytest.approx(sum(r["score"] for r in lines) / 6)
    run = json.loads((output_dir(cfg) / "run.json").read_text())
    assert run["settings"]["benchmark"]["haystack_order_sha256"]


@pytest.mark.parametrize("method", ["fullkv", "streamingllm", "h2o", "snapkv", "pyramidkv", "dynamickv"])
@pytest.mark.parametrize("protocol", ["dynamickv", "kvcache_factory", "official"])
def test_every_method_and_protocol_composes_and_validates(tmp_path, method, protocol):
    job = prepare(compose(overrides(tmp_path, f"method={method}", "budget=128", f"protocol={protocol}")))
    assert job.method.name == method
    if method == "streamingllm" and protocol == "kvcache_factory":
        assert job.method.window_size == 124  # budget - 4: four sink tokens
    if method != "fullkv":
        assert job.method.budget == 128
        suffix = "" if protocol == "dynamickv" else f"_{protocol}"
        assert job.out.name == f"{method}_128{suffix}"


def test_uncached_hub_model_is_a_clear_error(tmp_path, monkeypatch):
    from kvbench.models import ModelSpec, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvbenchError, match="model=smollm2_135m"):
        load_model(ModelSpec(name="x", hub_id="nobody/no-such-model-kvbench"))


def test_longbench_e_run_scores_length_buckets(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"input": "What is it?", "context": "Some context. " * 50, "answers": ["Paragraph 3"], "length": length,
             "dataset": "passage_retrieval_en", "language": "en", "all_classes": None, "_id": f"id{i}"}
            for i, length in enumerate([1200, 5000, 9000])]
    (data / "passage_retrieval_en_e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(["model=tiny_llama", "benchmark=longbench_e", f"benchmark.data_dir={data}",
                   "benchmark.tasks=[passage_retrieval_en_e]", "benchmark.verify_checksums=false",
                   f"results_root={tmp_path}", "progress=false", "method=snapkv", "budget=64"])
    scores = evaluate(cfg)
    assert scores["benchmark"] == "longbench_e"
    assert set(scores["longbench_e"]["passage_retrieval_en"]) == {"0-4k", "4-8k", "8k+"}
    assert len(read_predictions(output_dir(cfg) / "predictions" / "passage_retrieval_en_e.jsonl")) == 3


def test_unverified_file_is_refused_by_default(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / f"{TASK}.jsonl").write_text((SHARED_LONGBENCH / f"{TASK}.jsonl").read_text().replace("段落", "段", 1))
    cfg = compose(["model=tiny_llama", f"benchmark.data_dir={data}", f"benchmark.tasks=[{TASK}]",
                   f"results_root={tmp_path}", "progress=false", "benchmark.limit=1"])
    with pytest.raises(KvbenchError, match=f"{TASK}.jsonl.*verify_checksums=false"):
        evaluate(cfg)
