"""Sweep planning (expansion, FullKV collapse, done/partial/todo, cost, commands), the bash wrappers' dry runs,
and the two scale-out launchers (submitit local executor, joblib) on the tiny model."""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kvbench.sweep import (CostModel, PlannedJob, SweepError, _factor, assign_shards, commands, job_work, main,
                           parse_sweep, plan, with_defaults)

from conftest import REPO, SHARED_LONGBENCH
TASKS = "benchmark.tasks=[passage_retrieval_zh,multi_news]"


def fake_run(root: Path, run: str, status: str, predictions: dict[str, int] | None = None,
             benchmark: dict | None = None, model: str = "tiny_llama") -> Path:
    """A result folder as the pipeline leaves it: run.json (+ prediction lines; a "complete" run given no
    predictions holds every sample of every LongBench task)."""
    if status == "complete" and predictions is None:
        from kvbench.longbench.data import load_manifest

        predictions = {name[:-len(".jsonl")]: entry["lines"] for name, entry in load_manifest().items()
                       if not name.endswith("_e.jsonl")}
    folder = root / model / "longbench" / run
    (folder / "predictions").mkdir(parents=True)
    config = {"benchmark": benchmark} if benchmark else {}
    (folder / "run.json").write_text(json.dumps({"status": status, "config": config}))
    for task, lines in (predictions or {}).items():
        (folder / "predictions" / f"{task}.jsonl").write_text("".join(f'{{"_id": {i}}}\n' for i in range(lines)))
    return folder


def base(tmp_path: Path) -> list[str]:
    return ["model=tiny_llama", TASKS, "benchmark.limit=3", f"results_root={tmp_path}"]


# ----------------------------------------------------------------------------------------------- expansion


def test_grid_expands_and_fullkv_collapses_to_one_job(tmp_path):
    _, jobs = plan(base(tmp_path) + ["method=fullkv,snapkv,dynamickv", "budget=64,128"])
    assert [job.label.split("/")[-1] for job in jobs] == [
        "fullkv", "snapkv_64", "snapkv_128", "dynamickv_64", "dynamickv_128"]  # first axis slowest, as Hydra
    assert jobs[1].out == tmp_path / "tiny_llama" / "longbench" / "snapkv_64"
    assert {job.status for job in jobs} == {"todo"}


def test_range_sweep_and_quoted_values_use_hydra_grammar():
    sweep = parse_sweep(["budget=range(64,257,64)", "tag='a,b',c", "benchmark.tasks=[trec,lcc]", "-m"])
    assert sweep.fixed == ["benchmark.tasks=[trec,lcc]"]
    assert [(a.key, a.values) for a in sweep.axes] == [("budget", ("64", "128", "192", "256")),
                                                       ("tag", ("'a,b'", "c"))]
    assert sweep.axes[0].typed == (64, 128, 192, 256)


def test_same_folder_for_different_settings_is_an_error(tmp_path):
    # A method setting is not part of the result path: two windows would mix into one folder.
    with pytest.raises(SweepError, match="both write to .*snapkv_64.*tag="):
        plan(base(tmp_path) + ["method=snapkv", "budget=64", "method.window_size=8,16"])


def test_protocols_get_their_own_folders(tmp_path):
    _, jobs = plan(base(tmp_path) + ["method=fullkv", "protocol=dynamickv,kvcache_factory"])
    assert sorted(Path(job.out).name for job in jobs) == ["fullkv", "fullkv_kvcache_factory"]


def test_key_given_twice_is_an_error():
    with pytest.raises(SweepError, match="budget is given twice"):
        parse_sweep(["budget=64", "budget=128"])


def test_defaults_yield_to_overrides_of_the_same_key():
    merged = with_defaults(["method=snapkv", "+launcher=slurm"], ["method=fullkv,h2o", "budget=64", "launcher=x"])
    assert merged == ["budget=64", "method=snapkv", "+launcher=slurm"]


# ----------------------------------------------------------------------------------------------- status


def test_done_partial_todo_and_conflict(tmp_path):
    # The planner agrees with the result store: a finished run with a larger limit holds this selection (done: the
    # run would only rescore it); one with a smaller limit lacks samples (partial: the run adds them).
    larger = {"tasks": ["passage_retrieval_zh", "multi_news"], "limit": 5}
    fake_run(tmp_path, "snapkv_64", "complete", predictions={"passage_retrieval_zh": 5, "multi_news": 5},
             benchmark=larger)
    fake_run(tmp_path, "snapkv_128", "running", predictions={"passage_retrieval_zh": 2, "multi_news": 1})
    fake_run(tmp_path, "h2o_64", "complete", predictions={"passage_retrieval_zh": 2, "multi_news": 2},
             benchmark={**larger, "limit": 2})
    corrupt = fake_run(tmp_path, "h2o_128", "complete", predictions={})
    (corrupt / "run.json").write_text("{not json")
    _, jobs = plan(base(tmp_path) + ["method=snapkv,h2o", "budget=64,128"])
    by_name = {job.label.split("/")[-1]: job for job in jobs}
    assert {n: j.status for n, j in by_name.items()} == {
        "snapkv_64": "done", "h2o_64": "partial", "snapkv_128": "partial", "h2o_128": "conflict"}
    assert "corrupt" in by_name["h2o_128"].note
    assert (by_name["snapkv_64"].samples_total, by_name["snapkv_64"].samples_left) == (6, 0)
    assert by_name["snapkv_64"].seconds_left == 0
    assert by_name["snapkv_128"].samples_left == 6 - 3
    assert by_name["h2o_64"].samples_left == 2
    _, [fresh] = plan(base(tmp_path) + ["method=pyramidkv", "budget=64"])
    assert fresh.status == "todo" and fresh.samples_left == 6


def test_folder_held_by_a_live_run_is_skipped_not_resubmitted(tmp_path):
    from kvbench.results import FolderLock

    held = fake_run(tmp_path, "snapkv_64", "running", predictions={"passage_retrieval_zh": 1})
    lock = FolderLock(held)
    lock.acquire()
    try:
        sweep, jobs = plan(base(tmp_path) + ["method=snapkv", "budget=64,128"])
        by_name = {job.label.split("/")[-1]: job for job in jobs}
        assert by_name["snapkv_64"].status == "running" and f"pid {os.getpid()}" in by_name["snapkv_64"].note
        assert not by_name["snapkv_64"].remaining
        assert commands(sweep, [j for j in jobs if j.remaining]) == [
            ["-m", *base(tmp_path), "method=snapkv", "budget=128"]]
    finally:
        lock.release()
    _, jobs = plan(base(tmp_path) + ["method=snapkv", "budget=64"])
    assert jobs[0].status == "partial"  # the lock dies with its holder: never stale


def test_needle_grid_subset_of_a_finished_grid_is_done(tmp_path):
    folder = tmp_path / "tiny_llama" / "needle" / "snapkv_64"
    (folder / "predictions").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"status": "complete"}))
    cells = [f"{length}_{depth}" for length in (400, 600) for depth in (0, 50, 100)]
    (folder / "predictions" / "needle.jsonl").write_text("".join(json.dumps({"cell": c}) + "\n" for c in cells))
    grid = ["model=tiny_llama", "benchmark=needle", "method=snapkv", "budget=64", f"results_root={tmp_path}",
            "benchmark.grid.start=400", "benchmark.grid.step=200", "benchmark.grid.depths=3"]
    _, [smaller] = plan(grid + ["benchmark.grid.end=400"])
    _, [larger] = plan(grid + ["benchmark.grid.end=800"])
    assert (smaller.status, smaller.samples_left) == ("done", 0)
    assert (larger.status, larger.samples_left) == ("partial", 3)


def test_folder_without_run_json_is_partial(tmp_path):
    (tmp_path / "tiny_llama" / "longbench" / "snapkv_64").mkdir(parents=True)
    _, jobs = plan(base(tmp_path) + ["method=snapkv", "budget=64"])
    assert jobs[0].status == "partial"


# ----------------------------------------------------------------------------------------------- cost


def test_cost_arithmetic_longbench_capped_and_uncapped(tmp_path):
    cost = CostModel(seconds_per_ktoken=1.0, seconds_per_token=0.5)
    # multi_news: 2,741,331 bytes / 200 samples / 4 bytes per token = 3426.66375 tokens; 512 new tokens.
    _, [tiny] = plan(["model=tiny_llama", "benchmark.tasks=[multi_news]", "benchmark.limit=10",
                      f"results_root={tmp_path}", "method=snapkv"], cost)
    assert tiny.samples_left == 10
    assert tiny.seconds_left == pytest.approx(10 * 1024 / 1000 + 10 * 512 * 0.5)   # capped at max_input_len
    _, [llama] = plan(["model=llama3_8b_instruct", "benchmark.tasks=[multi_news]", f"results_root={tmp_path}",
                       "method=snapkv"], cost)
    assert llama.samples_left == 200
    assert llama.seconds_left == pytest.approx(200 * 3426.66375 / 1000 + 200 * 512 * 0.5)


def test_cost_arithmetic_needle_grid(tmp_path):
    cost = CostModel(seconds_per_ktoken=1.0, seconds_per_token=0.5)
    _, [job] = plan(["model=tiny_llama", "benchmark=needle", "benchmark/grid=demo", "method=snapkv",
                     f"results_root={tmp_path}"], cost)
    [work] = job_work(job.cfg)
    # lengths 1000, 2000 x 4 depths; 30 new tokens per cell
    assert (work.samples, work.prompt_tokens, work.new_tokens) == (8, 12000.0, 240.0)
    assert job.seconds_left == pytest.approx(12.0 + 120.0)


def test_ruler_jobs_are_planned_per_task_and_length(tmp_path):
    cost = CostModel(seconds_per_ktoken=1.0, seconds_per_token=0.0)
    _, [job] = plan(["model=tiny_llama", "benchmark=ruler", "benchmark.tasks=[niah_single_1,vt]",
                     "benchmark.lengths=[1024,2048]", "benchmark.samples=3", "method=snapkv",
                     f"results_root={tmp_path}"], cost)
    assert (job.status, job.samples_total, job.samples_left) == ("todo", 12, 12)
    assert job.seconds_left == pytest.approx(2 * 3 * (1024 + 2048) / 1000)


def test_negative_cost_is_rejected():
    with pytest.raises(SweepError, match="must be >= 0"):
        CostModel(seconds_per_ktoken=-1)


# ----------------------------------------------------------------------------------------------- commands


def expand_command(args: list[str], keys: list[str]) -> set[tuple[str, ...]]:
    """The jobs a `-m` command runs, as value tuples over the swept keys."""
    values = dict(arg.split("=", 1) for arg in args[1:])
    return set(itertools.product(*(values[k].split(",") for k in keys)))


def test_commands_cover_only_the_remaining_jobs(tmp_path):
    fake_run(tmp_path, "snapkv_64", "complete")
    fake_run(tmp_path, "fullkv", "complete")
    sweep, jobs = plan(base(tmp_path) + ["method=fullkv,snapkv,dynamickv", "budget=64,128"])
    cmds = commands(sweep, [job for job in jobs if job.remaining])
    assert len(cmds) == 2  # {snapkv_128, dynamickv_64, dynamickv_128} is no single product; two suffice
    fixed = ["-m", "model=tiny_llama", TASKS, "benchmark.limit=3", f"results_root={tmp_path}"]
    assert all(cmd[:5] == fixed for cmd in cmds)
    runs = set().union(*(expand_command(cmd, ["method", "budget"]) for cmd in cmds))
    assert runs == {("snapkv", "128"), ("dynamickv", "64"), ("dynamickv", "128")}
    assert sum(len(expand_command(cmd, ["method", "budget"])) for cmd in cmds) == 3  # nothing twice


def test_unfinished_full_grid_is_one_command(tmp_path):
    sweep, jobs = plan(base(tmp_path) + ["method=snapkv,h2o", "budget=64,128"])
    assert commands(sweep, jobs) == [["-m"] + base(tmp_path) + ["method=snapkv,h2o", "budget=64,128"]]


def test_plan_cli_prints_commands_and_dry_run_prints_table(tmp_path, capsys):
    fake_run(tmp_path, "snapkv_64", "complete")
    assert main(["plan"] + base(tmp_path) + ["method=snapkv", "budget=64,128"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].endswith("method=snapkv budget=128") and "-m" in out[0]
    assert main(["plan", "--dry-run"] + base(tmp_path) + ["method=snapkv", "budget=64,128"]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "jobs: 2  done: 1  to do: 1" in out and "would run:" in out


def test_cli_reports_bad_override_without_traceback(tmp_path, capsys):
    assert main(["plan", "model=no_such_model", f"results_root={tmp_path}"]) == 2
    assert "no_such_model" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(20))
def test_factor_covers_exactly_the_given_jobs(seed):
    rng = random.Random(seed)
    grid = list(itertools.product("ab", "xyz", "12"))
    rows = rng.sample(grid, rng.randint(1, len(grid)))
    covered = [combo for block in _factor(rows) for combo in itertools.product(*block)]
    assert sorted(covered) == sorted(rows)  # every job exactly once


def test_shards_balance_estimated_cost():
    def job(i: int, seconds: float) -> PlannedJob:
        cfg = OmegaConf.create({"model": {"name": "m"}, "benchmark": {"name": "longbench"},
                                "method": {"name": f"x{i}"}, "budget": 1,
                                "protocol": {"name": "dynamickv"}})
        return PlannedJob({}, cfg, Path(f"/r/{i}"), seconds_left=seconds)

    jobs = [job(i, s) for i, s in enumerate([5.0, 4.0, 3.0, 3.0, 1.0])]
    assign_shards(jobs, 2)
    loads = [sum(j.seconds_left for j in jobs if j.shard == k) for k in range(2)]
    assert sorted(loads) == [8.0, 8.0]


# ----------------------------------------------------------------------------------------------- bash scripts


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "DRY_RUN": "1", **env}
    return subprocess.run(["bash", str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          env=environment, cwd=REPO, timeout=120)


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_sweep_longbench_dry_run(tmp_path):
    fake_run(tmp_path, "fullkv", "complete", model="llama3_8b_instruct")
    result = run_script("sweep_longbench.sh", f"results_root={tmp_path}", "budget=128,256")
    assert result.returncode == 0, result.stderr
    assert "jobs: 11  done: 1  to do: 10" in result.stdout
    assert "llama3_8b_instruct/longbench/dynamickv_256" in result.stdout
    assert "method=streamingllm,h2o,snapkv,pyramidkv,dynamickv budget=128,256" in result.stdout


def test_sweep_needle_dry_run(tmp_path):
    result = run_script("sweep_needle.sh", "--dry-run", f"results_root={tmp_path}", "method=fullkv,snapkv",
                        DRY_RUN="0")
    assert result.returncode == 0, result.stderr
    assert "jobs: 2  done: 0  to do: 2" in result.stdout
    assert "710/710" in result.stdout  # the Llama-3 grid: 71 lengths x 10 depths


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_reproduce_dynamickv_dry_run(tmp_path):
    fake_run(tmp_path, "snapkv_128", "complete", model="qwen2_7b_instruct")
    result = run_script("reproduce_dynamickv.sh", f"results_root={tmp_path}")
    assert result.returncode == 0, result.stderr
    # 4 models x (1 FullKV + 5 methods x 7 budgets)
    assert "jobs: 144  done: 1  to do: 143" in result.stdout
    assert "internlm25_7b_chat_1m/longbench/pyramidkv_2048" in result.stdout
    assert result.stdout.count("python ") >= 2  # one job done: no longer a single product


@pytest.mark.launcher  # a whole CLI run in a subprocess: make test-slow
def test_multi_gpu_dry_run_splits_jobs(tmp_path):
    result = run_script("sweep_multi_gpu.sh", f"results_root={tmp_path}", "model=tiny_llama",
                        "method=snapkv,h2o", "budget=64,128", NUM_GPUS="2")
    assert result.returncode == 0, result.stderr
    assert "gpu" in result.stdout and "per GPU (h): 0: " in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if "tiny_llama/longbench" in line]
    assert sorted(row[4] for row in rows) == ["0", "0", "1", "1"]


def test_multi_gpu_without_gpus_says_how_to_fix(tmp_path):
    result = run_script("sweep_multi_gpu.sh", "model=tiny_llama", NUM_GPUS="0", DRY_RUN="0")
    assert result.returncode == 2 and "NUM_GPUS" in result.stderr


# ----------------------------------------------------------------------------------------------- launchers


def tiny_run_overrides(tmp_path: Path) -> list[str]:
    return ["model=tiny_llama", "budget=64", f"benchmark.data_dir={SHARED_LONGBENCH}",
            "benchmark.tasks=[passage_retrieval_zh]", "benchmark.limit=1", f"results_root={tmp_path}",
            f"hydra.sweep.dir={tmp_path}/multirun", "progress=false", "device=cpu"]


def assert_finished(folder: Path) -> None:
    assert json.loads((folder / "run.json").read_text())["status"] == "complete"
    lines = (folder / "predictions" / "passage_retrieval_zh.jsonl").read_text().splitlines()
    assert len(lines) == 1


def run_multirun(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two workers on two cores: no oversubscription
    return subprocess.run([sys.executable, str(REPO / "run.py"), "-m", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=400)  # a loaded 2-core machine needs minutes


@pytest.mark.launcher
def test_submitit_local_executor_runs_a_job(tmp_path):
    result = run_multirun(["+launcher=local", "method=snapkv"] + tiny_run_overrides(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_finished(tmp_path / "tiny_llama" / "longbench" / "snapkv_64")
    assert list((tmp_path / "multirun" / ".submitit").glob("*/*_0_result.pkl"))  # it went through submitit
    # Issue 17.4: the recorded command is the user's run.py overrides, not the submitit worker's command line.
    command = json.loads((tmp_path / "tiny_llama" / "longbench" / "snapkv_64" / "run.json").read_text())["command"]
    assert command.startswith("python run.py +launcher=local method=snapkv model=tiny_llama budget=64 ")
    assert "submitit.core" not in command and ".pkl" not in command
    # The planner reads the real run.json as done (same tasks and limit), so a rerun skips it.
    _, [job] = plan(["method=snapkv"] + tiny_run_overrides(tmp_path))
    assert job.status == "done"


@pytest.mark.launcher
def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path):
    result = run_multirun(["+launcher=joblib", "hydra.launcher.n_jobs=2", "method=snapkv,streamingllm"]
                          + tiny_run_overrides(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    for run in ("snapkv_64", "streamingllm_64"):
        assert_finished(tmp_path / "tiny_llama" / "longbench" / run)
