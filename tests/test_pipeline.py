"""The pipeline end to end on a tiny model and real LongBench data: results, resume, refusal to mix, clear errors."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_LONGBENCH
from kvbench.config import compose, output_dir
from kvbench.errors import KvbenchError
from kvbench.pipeline import evaluate, prepare
from kvbench.results import read_predictions

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses: tiny models run fastest on one thread
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
    assert run["sessions"][0]["model_load_s"] >= 0  # loading the weights, apart from the samples' timings
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


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model or tokenizer fails the test: the checks under test must come first."""
    import kvbench.pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the settings were checked")

    monkeypatch.setattr(kvbench.pipeline, "load_model", forbidden)
    monkeypatch.setattr(kvbench.pipeline, "load_tokenizer", forbidden)


@pytest.mark.parametrize("extra, message", [
    (["method=snapkv", "budget=32"], "budget=32 must be larger than method.window_size=32"),
    (["method=snapkv", "method.kernel_size=6"], "kernel_size=6 must be odd"),
    (["method=snapkv", "method.pooling=meanpool"], "choose avgpool or maxpool"),
    (["method=dynamickv", "method.mode=fast"], "choose one of official, fixed"),
    (["method=h2o", "method.cache_heads=both"], "per_query_head, per_kv_head"),
    (["benchmark.tasks=[nosuchtask]"], "unknown LongBench task 'nosuchtask'"),
    (["benchmark.data_dir=/no/such/folder"], "is not a folder"),
    (["protocol.eos=sometimes"], "eos"),
    # Item 6: wrong types are one-line errors naming the key, from the one config schema.
    (["method=snapkv", "budget=abc"], "budget=abc: expected a whole number of tokens"),
    (["method=snapkv", "method.kernel_size=abc"], "method.kernel_size=abc: expected an integer"),
    (["method=snapkv", "method.window_size=abc"], "method.window_size=abc: expected an integer"),
    (["seed=abc"], "seed=abc: expected an integer"),
    (["device=tpu"], "device=tpu: expected auto, cpu, cuda"),
    (["output_dir=/etc/passwd"], "output_dir=/etc/passwd is a file"),
    (["benchmark.verify_checksums=abc"], "benchmark.verify_checksums=abc: expected true or false"),
    (["benchmark.limit=0"], "benchmark.limit=0: expected a positive integer"),
    (["model.max_input_len=-5"], "model.max_input_len=-5: expected a positive integer"),
    (["progress=maybe"], "progress=maybe: expected true or false"),
    # Item 3: a budget above 1 is a whole number of tokens; budget=1.5 with a 1-token window kept only the window.
    (["method=snapkv", "budget=64.7"], "budget=64.7: expected a whole number of tokens"),
    (["method=streamingllm", "budget=1.5", "method.window_size=1"], "budget=1.5: expected a whole number"),
    (["method=streamingllm", "budget=1", "method.window_size=1"], "budget=1 must be larger than method.window_size"),
])
def test_bad_settings_fail_before_any_model_is_loaded(tmp_path, no_model, extra, message):
    cfg = compose(overrides(tmp_path, *extra))
    with pytest.raises(KvbenchError, match=message) as caught:
        evaluate(cfg)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "tiny_llama").exists()  # no folder is created by a command that fails its checks


def test_whole_number_budgets_and_fractions_are_accepted(tmp_path):
    assert prepare(compose(overrides(tmp_path, "method=snapkv", "budget=128.0"))).method.budget == 128
    job = prepare(compose(overrides(tmp_path, "method=snapkv", "budget=0.25")))
    assert job.method.budget == 0.25 and job.out.name == "snapkv_0.25"


def test_cli_reports_errors_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", *overrides(tmp_path, "method=snapkv", "budget=16")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert proc.returncode == 2
    assert "budget=16 must be larger than method.window_size=32" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


class StopAfter:
    """on_sample hook that presses Ctrl-C (raises KeyboardInterrupt) after `n` samples."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, []

    def __call__(self, task, record) -> None:
        self.seen.append(record["_id"])
        if len(self.seen) == self.n:
            raise KeyboardInterrupt


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes_to_the_same_predictions(tmp_path):
    # Items 5 and 17.3: one line, status "interrupted"; the resumed run adds a session, totals cover both.
    from kvbench.pipeline import Interrupted

    cfg = compose(overrides(tmp_path, "method=dynamickv", "budget=64", "benchmark.limit=5"))
    out = output_dir(cfg)
    with pytest.raises(Interrupted, match="^interrupted after 2 samples; rerun the same command to resume"):
        evaluate(cfg, on_sample=StopAfter(2))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "interrupted" and len(read_predictions(out / "predictions" / f"{TASK}.jsonl")) == 2
    assert run["sessions"][0]["status"] == "interrupted" and run["timing"]["samples"] == 2
    resumed_ids = []
    scores = evaluate(cfg, on_sample=lambda task, rec: resumed_ids.append(rec["_id"]))
    resumed = read_predictions(out / "predictions" / f"{TASK}.jsonl")
    assert len(resumed_ids) == 3 and len(resumed) == 5 and len({r["_id"] for r in resumed}) == 5
    assert scores["n"] == {TASK: 5}
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and [s["status"] for s in run["sessions"]] == ["interrupted", "complete"]
    assert [s["timing"]["samples"] for s in run["sessions"]] == [2, 3] and run["timing"]["samples"] == 5
    assert run["timing"]["total_s"] == pytest.approx(sum(s["timing"]["total_s"] for s in run["sessions"]), abs=0.02)
    # Same predictions as an uninterrupted run.
    fresh = compose(overrides(tmp_path / "fresh", "method=dynamickv", "budget=64", "benchmark.limit=5"))
    evaluate(fresh)
    again = read_predictions(output_dir(fresh) / "predictions" / f"{TASK}.jsonl")
    assert [(r["_id"], r["pred"]) for r in again] == [(r["_id"], r["pred"]) for r in resumed]


def test_cli_ctrl_c_exits_130(tmp_path, monkeypatch):
    import importlib.util

    import kvbench.pipeline

    spec = importlib.util.spec_from_file_location("kvbench_run_py", REPO / "run.py")
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    monkeypatch.setattr(run_py, "evaluate", lambda cfg: (_ for _ in ()).throw(
        kvbench.pipeline.Interrupted("interrupted after 7 samples; rerun the same command to resume")))
    with pytest.raises(SystemExit) as exited:
        run_py.main(compose(overrides(tmp_path)))  # Hydra passes a given config straight to the task function
    assert exited.value.code == 130


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


def test_unreachable_hub_fails_at_once_without_retrying(monkeypatch):
    # Item 7: not cached and no connection (no HF_HUB_OFFLINE set): fail before transformers starts its retries.
    import transformers

    from kvbench.models import ModelSpec, load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(
        lambda cls, *a, **k: (_ for _ in ()).throw(AssertionError("transformers was asked to download"))))
    with pytest.raises(KvbenchError, match="not in the local cache and the hub is unreachable.*huggingface-cli "
                                           "download nobody/no-such-model-kvbench") as caught:
        load_model(ModelSpec(name="x", hub_id="nobody/no-such-model-kvbench"))
    assert "\n" not in str(caught.value)


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


# ------------------------------------------------------------------------------------------- issue 10 / 17 items


def test_second_run_into_a_held_folder_fails_at_once_naming_the_holder(tmp_path):
    # Item 1 / 17.1: the folder lock; the kernel releases it when its holder exits, so it is never stale.
    from kvbench.results import FolderLock, folder_locked

    cfg = compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1"))
    out = output_dir(cfg)
    out.mkdir(parents=True)
    lock = FolderLock(out)
    lock.acquire()
    try:
        assert f"pid {os.getpid()}" in folder_locked(out)
        with pytest.raises(KvbenchError, match=f"is being written by another run \\(pid {os.getpid()} on"):
            evaluate(cfg)
    finally:
        lock.release()
    assert folder_locked(out) is None
    assert evaluate(cfg)["n"] == {TASK: 1}


def test_two_processes_on_one_folder_never_duplicate_a_sample(tmp_path):
    # Item 1 / 17.1 / 17.4 / 8: two identical commands at once, as parallel launchers start them.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [sys.executable, str(REPO / "run.py"), *overrides(tmp_path, "method=snapkv", "budget=64",
                                                              "benchmark.limit=3")]
    procs = [subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ONE_THREAD)
             for _ in range(2)]
    results = [(proc.wait(timeout=600), proc.stdout.read()) for proc in procs]
    out = tmp_path / "tiny_llama" / "longbench" / "snapkv_64"
    lines = read_predictions(out / "predictions" / f"{TASK}.jsonl")
    assert len(lines) == 3 and len({r["_id"] for r in lines}) == 3
    assert json.loads((out / "scores.json").read_text())["n"] == {TASK: 3}
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, text in results:
        assert "Traceback" not in text
        if code == 2:  # the one that lost the race says why, in one line
            assert "is being written by another run (pid" in text
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "python run.py " + " ".join(shlex.quote(a) for a in args[2:])  # 17.4: the user's
    assert os.listdir(cwd) == []  # item 8: no Hydra outputs/ in the current folder
    for name in ("run.json", "scores.json"):  # item 9: readable like the prediction files
        assert (out / name).stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_duplicated_ids_are_scored_once_with_a_warning(tmp_path):
    cfg = compose(overrides(tmp_path, "method=fullkv", "benchmark.limit=3"))
    evaluate(cfg)
    path = output_dir(cfg) / "predictions" / f"{TASK}.jsonl"
    first = path.read_bytes().splitlines(keepends=True)[0]
    path.write_bytes(path.read_bytes() + first + first)  # e.g. two merged copies of a folder
    with pytest.warns(UserWarning, match="2 duplicated _id line"):
        scores = evaluate(cfg)
    assert scores["n"] == {TASK: 3}


def test_a_smaller_selection_scores_only_itself_and_reports_the_rest(tmp_path):
    # Item 2 and 17.3: limit=1 after limit=3 scores n=1; the rest stays on disk; run.json is left as it was.
    cfg3 = compose(overrides(tmp_path, "method=streamingllm", "budget=64", "benchmark.limit=3"))
    full = evaluate(cfg3)
    out = output_dir(cfg3)
    record = (out / "run.json").read_bytes()
    one = evaluate(compose(overrides(tmp_path, "method=streamingllm", "budget=64", "benchmark.limit=1")))
    assert one["n"] == {TASK: 1} and one["also_on_disk"] == {TASK: 2} and one["selection"]["limit"] == 1
    first = read_predictions(out / "predictions" / f"{TASK}.jsonl")[0]
    from kvbench.longbench.scoring import score_task
    assert one["tasks"][TASK] == pytest.approx(score_task(TASK, [first]))
    assert len(read_predictions(out / "predictions" / f"{TASK}.jsonl")) == 3
    assert (out / "run.json").read_bytes() == record  # a rerun that generates nothing leaves the record
    assert evaluate(cfg3)["tasks"] == full["tasks"]
    assert (out / "run.json").read_bytes() == record  # also the identical rerun of a finished job (17.3)


def test_dropping_a_task_removes_it_from_the_scores_and_the_average(tmp_path):
    two = overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1")
    two = [o if not o.startswith("benchmark.tasks=") else f"benchmark.tasks=[{TASK},multifieldqa_zh]" for o in two]
    evaluate(compose(two))
    one = evaluate(compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1")))
    assert list(one["tasks"]) == [TASK] and one["avg"] == one["tasks"][TASK]
    assert one["also_on_disk"] == {"multifieldqa_zh": 1}


def test_a_smaller_needle_grid_scores_only_its_cells(tmp_path):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("The sky was grey over the harbour. Boats came in slowly. " * 60)
    base = ["model=tiny_llama", "benchmark=needle", f"benchmark.haystack_dir={hay}", "method=snapkv", "budget=64",
            f"results_root={tmp_path}", "progress=false", "benchmark.grid.start=400", "benchmark.grid.step=200",
            "benchmark.grid.depths=2", "benchmark.max_new_tokens=4"]
    evaluate(compose(base + ["benchmark.grid.end=600"]))
    small = evaluate(compose(base + ["benchmark.grid.end=400"]))
    lines = read_predictions(tmp_path / "tiny_llama" / "needle" / "snapkv_64" / "predictions" / "needle.jsonl")
    kept = [r for r in lines if r["context_length"] == 400]
    assert small["n"] == 2 and small["also_on_disk"] == {"needle": 2}
    assert small["mean_score"] == pytest.approx(sum(r["score"] for r in kept) / 2)


def test_fraction_budget_records_the_tokens_kept_per_sample(tmp_path):
    cfg = compose(overrides(tmp_path, "method=snapkv", "budget=0.1", "benchmark.limit=1"))
    evaluate(cfg)
    [line] = read_predictions(output_dir(cfg) / "predictions" / f"{TASK}.jsonl")
    assert line["budget_tokens"] == max(33, round(0.1 * line["prompt_tokens"]))
    assert line["layer_kept"] == [line["budget_tokens"]] * 4
    assert round(0.1 * line["prompt_tokens"]) > 33 and "budget_clamped" not in line and "budget_asked" not in line


def test_a_fraction_budget_held_at_the_methods_minimum_says_so_on_each_line(tmp_path):
    """budget=0.01 asks about 1% of the prompt, below SnapKV's window + 1 = 33: the line records what was asked,
    that it was clamped, and the 33 tokens held (what layer_kept shows)."""
    cfg = compose(overrides(tmp_path, "method=snapkv", "budget=0.01", "benchmark.limit=1"))
    evaluate(cfg)
    [line] = read_predictions(output_dir(cfg) / "predictions" / f"{TASK}.jsonl")
    asked = round(0.01 * line["prompt_tokens"])
    assert asked < 33 and line["budget_asked"] == asked and line["budget_clamped"] is True
    assert line["budget_tokens"] == 33 and line["layer_kept"] == [33] * 4


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path):
    # Item 4: checks that need no model run before the folder exists; an empty folder is reused by any settings.
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1") +
                  [f"benchmark.data_dir={empty}"])
    with pytest.raises(KvbenchError, match="not found"):
        evaluate(bad)
    assert not output_dir(bad).exists()
    # A folder left by a failed start of other settings (run.json but no prediction) is reused.
    out = output_dir(bad)
    (out / "predictions").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"fingerprint": "other", "settings": {"seed": 1}}))
    assert evaluate(compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1")))["n"] == {TASK: 1}


def test_relative_and_absolute_data_folder_are_the_same_settings(tmp_path, monkeypatch):
    # Item 10: paths are normalised in the fingerprint.
    monkeypatch.chdir(SHARED_LONGBENCH.parent)
    absolute = compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1"))
    relative = compose([o if not o.startswith("benchmark.data_dir=") else "benchmark.data_dir=longbench"
                        for o in overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=1")])
    from kvbench.pipeline import settings_of
    assert settings_of(prepare(absolute)) == settings_of(prepare(relative))


def test_tag_with_output_dir_says_it_is_unused(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="kvbench"):
        prepare(compose(overrides(tmp_path, "tag=perkv", f"output_dir={tmp_path / 'x'}")))
    assert "tag=perkv is not used: output_dir=" in caplog.text


def test_needle_runs_record_no_longbench_protocol(tmp_path):
    cfg = compose(["model=tiny_llama", "benchmark=needle", "protocol=official", "method=snapkv", "budget=64",
                   f"results_root={tmp_path}"])
    job = prepare(cfg)
    from kvbench.pipeline import run_record
    record = run_record(job)
    assert job.out.name == "snapkv_64" and record["protocol"] == "needle_raw" and "protocol" not in record["config"]


def test_official_protocol_records_final_length_and_warns_once_beyond_the_context(tmp_path, caplog):
    # Item 12: the chat template is added after truncation (as LongBench's pred.py): the final prompt can exceed
    # max_input_len; it is recorded per sample, and a prompt longer than the model's context warns once.
    cfg = compose(overrides(tmp_path, "method=snapkv", "budget=64", "benchmark.limit=2", "protocol=official",
                            "model.trained_len=1030"))
    with caplog.at_level("WARNING", logger="kvbench"):
        evaluate(cfg)
    lines = read_predictions(output_dir(cfg) / "predictions" / f"{TASK}.jsonl")
    assert all(r["prompt_tokens"] > 1024 and r["over_max_input_len"] for r in lines)
    assert caplog.text.count("more than the model's context (1030)") == 1


def test_run_py_help_opens_with_kvbench_usage():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", return_hydra_config=True)
    header = cfg.hydra.help.header.splitlines()
    assert header[0].startswith("kvbench: evaluate KV-cache compression") and header[2] == "Usage:"
    assert cfg.hydra.help.app_name == "kvbench"
    assert cfg.hydra.run.dir == "." and cfg.hydra.output_subdir is None  # item 8: nothing written in the cwd


def test_longbench_max_new_tokens_caps_every_task_and_is_a_recorded_setting(tmp_path):
    # A deviation for quick runs (the demo): each task's official max_gen capped; part of the settings.
    cfg = compose(overrides(tmp_path, "method=fullkv", "benchmark.limit=1", "benchmark.max_new_tokens=3"))
    evaluate(cfg)
    [line] = read_predictions(output_dir(cfg) / "predictions" / f"{TASK}.jsonl")
    assert line["new_tokens"] <= 3
    run = json.loads((output_dir(cfg) / "run.json").read_text())
    assert run["settings"]["benchmark"]["max_new_tokens"] == 3
    with pytest.raises(KvbenchError, match="different settings"):
        evaluate(compose(overrides(tmp_path, "method=fullkv", "benchmark.limit=1")))
