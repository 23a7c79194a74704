"""Issue 25 items 9 and 10: tracebacks that become one line, and checks that come before the model loads."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

import kvbench.pipeline
import kvbench.results
from conftest import SHARED_LONGBENCH
from kvbench.config import compose, output_dir
from kvbench.errors import KvbenchError
from kvbench.pipeline import evaluate, prepare
from kvbench.results import read_predictions

TASK = "passage_retrieval_zh"


def overrides(tmp_path, *extra):
    return ["model=tiny_llama", f"benchmark.data_dir={SHARED_LONGBENCH}", f"benchmark.tasks=[{TASK}]",
            f"results_root={tmp_path}", "progress=false", "benchmark.limit=3", "method=snapkv", "budget=64", *extra]


def no_model(monkeypatch):
    """Loading the weights fails the test: the check under test must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model weights were loaded before the check")
    monkeypatch.setattr(kvbench.pipeline, "load_model", forbidden)


@pytest.fixture(name="no_model")
def no_model_fixture(monkeypatch):
    no_model(monkeypatch)


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


# ---- item 9 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["method=dynamickv", "method.radio_max=nan"], "method.radio_max=NaN: expected a finite number"),
    (["method=cake", "method.gamma=nan"], "method.gamma=NaN: expected a finite number"),
    (["method=cake", "method.gamma=inf"], "method.gamma=Infinity: expected a finite number"),
])
def test_nan_method_settings_are_refused(tmp_path, extra, message):
    with pytest.raises(KvbenchError, match=message):
        prepare(compose(overrides(tmp_path, *extra)))


def test_nan_is_refused_by_the_methods_themselves():
    from kvbench.methods import build_method
    with pytest.raises(KvbenchError, match="radio_max=nan must be at least 1"):
        build_method("dynamickv", budget=128, radio_max=float("nan"))
    with pytest.raises(KvbenchError, match="gamma=nan.*finite"):
        build_method("cake", budget=128, gamma=float("nan"))


@pytest.fixture
def two_runs(tmp_path):
    """Two finished LongBench runs with per-sample scores (tiny model, 2 samples)."""
    dirs = []
    for method in ("fullkv", "snapkv"):
        cfg = compose(overrides(tmp_path / "results", f"method={method}", "benchmark.limit=2"))
        evaluate(cfg)
        dirs.append(output_dir(cfg))
    return dirs


def test_unwritable_out_of_compare_and_report_is_one_line(two_runs, tmp_path, capsys):
    from kvbench.compare import main as compare
    from kvbench.report.__main__ import main as report

    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    assert compare([str(two_runs[0]), str(two_runs[1]), "--out", str(blocked / "cmp.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and "choose a writable folder" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert report([str(tmp_path / "results"), "--out", str(blocked / "report")]) == 2
    err = capsys.readouterr().err
    assert "error: cannot write " in err and "Traceback" not in err


def test_unwritable_results_root_for_ruler_is_one_line_before_the_model(tmp_path, no_model):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    cfg = compose(["benchmark=ruler", "model=tiny_llama", "benchmark.lengths=[1024]", "benchmark.samples=1",
                   "benchmark.tasks=[vt]", f"results_root={blocked / 'results'}", "progress=false"])
    with pytest.raises(KvbenchError) as error:
        evaluate(cfg)
    assert one_line(error.value).startswith("cannot write the RULER data cache") and "results_root=" in str(error.value)


def test_disk_full_marks_the_run_failed_and_the_rerun_resumes_exactly(tmp_path, monkeypatch):
    clean = compose(overrides(tmp_path / "clean"))
    evaluate(clean)
    expected = read_predictions(output_dir(clean) / "predictions" / f"{TASK}.jsonl")

    cfg = compose(overrides(tmp_path / "full"))
    real = kvbench.results._append_line
    calls = []

    def disk_full(path, line):
        calls.append(path)
        if len(calls) == 2:  # half a line reaches the disk, then it is full
            with open(path, "ab") as handle:
                handle.write(line[: len(line) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, line)
    monkeypatch.setattr(kvbench.results, "_append_line", disk_full)
    with pytest.raises(KvbenchError) as error:
        evaluate(cfg)
    assert "No space left on device" in one_line(error.value) and "rerun the same command" in str(error.value)
    run = json.loads((output_dir(cfg) / "run.json").read_text())
    assert run["status"] == "failed" and "No space left" in run["sessions"][-1]["error"]

    monkeypatch.setattr(kvbench.results, "_append_line", real)
    with pytest.warns(UserWarning, match="dropped an incomplete last line"):
        evaluate(cfg)
    again = read_predictions(output_dir(cfg) / "predictions" / f"{TASK}.jsonl")
    strip = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731 - timings differ
    assert [strip(r) for r in again] == [strip(r) for r in expected]
    assert json.loads((output_dir(cfg) / "run.json").read_text())["status"] == "complete"


def test_finished_run_on_a_read_only_mount(tmp_path, monkeypatch, capsys):
    """A rerun refuses in one line before the model loads; sample_scores says it cannot write, in one line."""
    cfg = compose(overrides(tmp_path))
    run_dir = output_dir(cfg)
    evaluate(cfg)  # a finished run
    no_model(monkeypatch)  # from here on, loading the weights fails the test
    real_access = os.access

    def read_only(path, mode):  # what access(2) answers on a read-only mount, even to root
        inside = Path(path).resolve().is_relative_to(run_dir.resolve())
        return False if inside and mode & os.W_OK else real_access(path, mode)
    monkeypatch.setattr(os, "access", read_only)
    with pytest.raises(KvbenchError) as error:
        evaluate(cfg)
    assert "is not writable (a read-only mount?)" in one_line(error.value) and "output_dir=" in str(error.value)

    import tempfile

    from kvbench.sample_scores import main as sample_scores

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    assert sample_scores([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---- item 10 -----------------------------------------------------------------------------------------------------
def test_agnostic_question_longer_than_max_input_len_is_truncated_as_aware_mode_does():
    from conftest import protocol_preset as get_protocol
    from kvbench.longbench.protocol import build_prompt, build_split_prompt
    from kvbench.models import EMBEDDED, load_tokenizer

    tok = load_tokenizer(EMBEDDED)
    example = {"context": "The archive holds letters from the harbour master. " * 40,
               "input": "Which of these was written in the winter of the flood year? " * 30, "answers": ["x"],
               "all_classes": None, "length": 100}
    for protocol, task in (("dynamickv", "passage_retrieval_en"), ("official", "hotpotqa")):
        proto = get_protocol(protocol)
        split, aware = build_split_prompt(task, example, tok, proto, 200)
        assert split.info["split_truncation"] == "question_cut"
        assert split.input_ids == aware.input_ids == build_prompt(task, example, tok, proto, 200).input_ids
        assert split.context_ids and split.question_ids
        assert "flood year" in tok.decode(split.question_ids)  # the kept tail of the question
        assert "harbour master" in tok.decode(split.context_ids)  # the kept head of the context


def test_sliding_window_model_in_agnostic_mode_is_refused_before_the_weights_load(tmp_path, no_model):
    hay = tmp_path / "hay"
    hay.mkdir()
    (hay / "a.txt").write_text("The sky was grey over the harbour. Boats came in slowly. " * 60)
    cfg = compose(["model=tiny_gemma3", "benchmark=needle", f"benchmark.haystack_dir={hay}", "method=snapkv",
                   "budget=64", f"results_root={tmp_path}", "progress=false", "benchmark.grid.start=400",
                   "benchmark.grid.end=400", "benchmark.grid.depths=1", "benchmark.query=agnostic"])
    with pytest.raises(KvbenchError, match="sliding-window or chunked layers"):
        evaluate(cfg)


def test_hub_data_offline_fails_fast_before_the_model_loads(tmp_path, monkeypatch, no_model):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached copy
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    cfg = compose(["model=tiny_llama", "benchmark.data_dir=null", f"benchmark.tasks=[{TASK}]",
                   f"results_root={tmp_path}", "progress=false"])
    start = time.perf_counter()
    with pytest.raises(KvbenchError) as error:
        evaluate(cfg)
    assert time.perf_counter() - start < 10
    assert "HF_HUB_OFFLINE is set" in one_line(error.value) and "benchmark.data_dir=" in str(error.value)


def test_a_bom_in_the_runs_own_predictions_does_not_break_the_resume(tmp_path):
    cfg = compose(overrides(tmp_path, "benchmark.limit=1"))
    evaluate(cfg)
    pred = output_dir(cfg) / "predictions" / f"{TASK}.jsonl"
    first = pred.read_bytes()
    pred.write_bytes(b"\xef\xbb\xbf" + first)  # saved by an editor that writes a byte-order mark
    scores = evaluate(compose(overrides(tmp_path, "benchmark.limit=2")))
    assert scores["n"][TASK] == 2
    lines = read_predictions(pred)
    assert len(lines) == 2 and lines[0] == json.loads(first)  # the first sample kept, not redone


def test_a_short_prediction_write_is_a_full_disk_not_a_silent_cut_line(tmp_path, monkeypatch):
    from kvbench.results import RunStore

    store = RunStore(tmp_path / "run", {}, {})
    store.predictions_dir.mkdir(parents=True)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:5]))  # the disk fills up mid-line
    try:
        with pytest.raises(KvbenchError, match=r"No space left on device\); free some space"):
            store.append("t", {"_id": "a", "pred": "x"})
    finally:
        monkeypatch.undo()
    assert len((store.prediction_file("t")).read_bytes()) == 5  # the cut line, dropped when the run resumes
