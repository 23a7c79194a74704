"""A new benchmark is one package and one config: the test-only `toy_passkey` (tests/toy_passkey, found through
`hydra.searchpath` and `benchmark.package`) runs through run.py, the sweep planner and runner, the report (a table
with CIs and n), compare and sample_scores, with no edit in kvbench."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

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
    assert "passkey" in table and "| n " in table.replace("|   n", "| n ") and "±" in table
    assert "SnapKV" in table and "FullKV" in table

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
