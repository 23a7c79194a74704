"""A new benchmark is one package and one config: the test-only `toy_passkey` (tests/toy_passkey, found through
`hydra.searchpath` and `benchmark.package`) runs through run.py, the sweep planner and runner, the report (a table
with CIs and n), compare and sample_scores, with no edit in kvbench."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from kvbench.benchmark import Benchmark, Prompt, Sample

TESTS = Path(__file__).resolve().parent
SEARCH = f"hydra.searchpath=[file://{TESTS / 'toy_passkey' / 'configs'}]"


def _env() -> dict:
    path = os.pathsep.join([str(REPO / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _python(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=600)


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _python([str(REPO / "run.py"), SEARCH, "benchmark=toy_passkey", "model=tiny_llama", "device=cpu",
                    "progress=false", f"results_root={tmp_path / 'results'}", *overrides], tmp_path)


def test_a_wrong_typed_key_is_one_line(tmp_path):
    result = _run(tmp_path, "benchmark.repeats=many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "benchmark.repeats=many: expected a positive integer" in result.stdout + result.stderr


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_toy_benchmark_runs_through_every_tool(tmp_path):
    results = tmp_path / "results"
    first = _run(tmp_path, "method=snapkv", "budget=48")
    assert first.returncode == 0, first.stderr[-3000:]
    snap = results / "tiny_llama" / "toy_passkey" / "snapkv_48"
    lines = [json.loads(x) for x in (snap / "predictions" / "passkey.jsonl").read_text().splitlines()]
    assert [x["_id"] for x in lines] == ["0", "1", "2"] and all("kv_bytes" in x for x in lines)
    assert json.loads((snap / "scores.json").read_text())["n"] == {"passkey": 3}
    again = _run(tmp_path, "method=snapkv", "budget=48", "benchmark.samples=4")  # resumes: one new sample
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((snap / "predictions" / "passkey.jsonl").read_text().splitlines()) == 4

    sweep = ["-m", "kvbench.sweep", "plan", SEARCH, "benchmark=toy_passkey", "model=tiny_llama", "device=cpu",
             "progress=false", f"results_root={results}", "method=fullkv,snapkv", "budget=48", "benchmark.samples=4"]
    planned = _python(sweep + ["--dry-run"], tmp_path)
    assert planned.returncode == 0, planned.stderr[-3000:]
    assert "Traceback" not in planned.stderr and "done" in planned.stdout and "todo" in planned.stdout
    sweep[2] = "run"
    ran = _python(sweep, tmp_path)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-3000:]
    full = results / "tiny_llama" / "toy_passkey" / "fullkv"
    assert json.loads((full / "run.json").read_text())["status"] == "complete"

    report = _python(["-m", "kvbench.report", str(results), "--out", str(tmp_path / "report"), "--ci", "pm"],
                     tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (tmp_path / "report" / "toy_passkey_scores.md").read_text()
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if "|" in line]
    header = next(r for r in rows if "Method" in r)
    assert {"n", "passkey", "Avg."} <= set(header)
    body = {r[header.index("Method")]: r for r in rows[rows.index(header) + 1:]}
    assert set(body) == {"FullKV", "SnapKV"} and body["SnapKV"][header.index("n")] == "4"
    assert "±" in body["SnapKV"][header.index("passkey")]  # a CI from the samples

    compare = _python(["-m", "kvbench.compare", str(snap), str(full)], tmp_path)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "passkey" in compare.stdout

    (snap / "sample_scores.jsonl").unlink()
    rebuilt = _python(["-m", "kvbench.sample_scores", str(snap)], tmp_path)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    rows = [json.loads(x) for x in (snap / "sample_scores.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["0", "1", "2", "3"] and {r["task"] for r in rows} == {"passkey"}


def test_kvbench_does_not_name_the_toy():
    source = "\n".join(p.read_text() for p in (REPO / "src" / "kvbench").rglob("*.py"))
    assert "toy_passkey" not in source and "passkey" not in source


def test_an_unknown_benchmark_package_is_one_line(tmp_path):
    from kvbench.config import compose, validate
    from kvbench.errors import KvbenchError

    cfg = compose([SEARCH, "benchmark=toy_passkey", "benchmark.name=toy_other", "benchmark.package=no_such_module"])
    with pytest.raises(KvbenchError, match="benchmark.package=no_such_module does not import"):
        validate(cfg)


class _Echo(Benchmark):
    """Samples a..d in two tasks; the prompt's first token is the sample's number, the 'answer' echoes it."""
    name = "echo_test"

    def select(self):
        return [Sample("t1" if i < 2 else "t2", key, i) for i, key in enumerate("abcd")]

    def prompts(self, todo, tokenizer, model):
        for sample in todo:
            yield sample, Prompt([sample.data, 7], 3, info={"n": sample.data})

    def record(self, sample, prompt, out, text):
        return {"_id": sample.key, "echo": text, "n": prompt.info["n"]}

    def summarize(self, store):
        return {t: [(r["_id"], r["echo"]) for r in store.records(t)] for t in ("t1", "t2")}


def test_the_pipeline_finds_each_sample_by_its_request_key_in_any_order(tmp_path):
    """A batching engine answers in completion order: every answer lands on its own sample, done samples are
    skipped on resume."""
    from kvbench.pipeline import predict
    from kvbench.results import RunStore

    def reversed_engine(requests):
        requests = list(requests)
        for request in reversed(requests):
            yield request, _Out(), str(request.input_ids[0])

    store = RunStore(tmp_path / "run", {"x": 1}, {})
    store.open()
    seen = []
    scores = predict(_Echo(), store, None, None, reversed_engine, on_sample=lambda task, r: seen.append(r["_id"]))
    assert seen == ["b", "a", "d", "c"]
    assert scores == {"t1": [("b", "1"), ("a", "0")], "t2": [("d", "3"), ("c", "2")]}
    asked = []
    assert predict(_Echo(), store, None, None, lambda rs: (asked.append(r) or (r, _Out(), "") for r in rs)) == scores
    assert asked == []


class _Out:
    def log_fields(self):
        return {}


def test_a_benchmark_adds_its_own_run_name_parts_between_the_query_mode_and_the_session():
    from kvbench.needle.runner import NeedlePlan

    class Wide(Benchmark):
        name = "wide_probe"

        @classmethod
        def variant_parts(cls, bench):
            return ["wide"] if bench.get("wide") else []

    bench = {"query": "agnostic", "wide": True, "session": True, "session_answers": "model"}
    assert Wide.name_parts(bench) == ["agnostic", "wide", "sessionmodel"]
    assert Wide.name_parts({"query": "aware"}) == []
    assert NeedlePlan.name_parts({"query": "agnostic", "multi_needle": True, "session": True}) == [
        "agnostic", "multineedle", "session"]
