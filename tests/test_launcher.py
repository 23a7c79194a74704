"""Launcher presets (configs/launcher) composed as Hydra sees them, and the multirun failure report
(kvbench.multirun): a failed job is named with its one-line error when the sweep ends. The real-cluster checks
are `make test-slurm` (scripts/slurm/test_slurm.py)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kvbench.config import CONFIG_DIR
from kvbench.errors import KvbenchError
from kvbench.multirun import ENV_ID, TARGET, FailureReport, JobFailed, job_error

REPO = Path(__file__).resolve().parents[1]


def compose_hydra(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides, return_hydra_config=True)


def launcher(preset: str) -> dict:
    return OmegaConf.to_container(compose_hydra([f"+launcher={preset}"]).hydra.launcher, resolve=False)


# ----------------------------------------------------------------------------------------------- presets


def test_gpu_preset_asks_for_one_gpu_and_requeues_on_time_limit():
    cfg = compose_hydra(["+launcher=slurm"])
    conf = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert conf["_target_"].endswith("SlurmLauncher")
    assert conf["gpus_per_node"] == 1 and conf["cpus_per_task"] == 8 and conf["mem_gb"] == 64
    assert conf["max_num_timeout"] >= 1            # a job at its time limit is requeued (the store resumes)
    assert 0 < conf["signal_delay_s"] < conf["timeout_min"] * 60
    assert cfg.device == "auto"


def test_cpu_preset_asks_for_no_gpu_and_keeps_the_rest():
    gpu, cpu = launcher("slurm"), launcher("slurm_cpu")
    assert cpu["gpus_per_node"] is None and cpu["gres"] is None and cpu["gpus_per_task"] is None
    assert cpu["mem_gb"] < gpu["mem_gb"] and cpu["max_num_timeout"] == gpu["max_num_timeout"]
    assert any("OMP_NUM_THREADS" in line for line in cpu["setup"])
    assert compose_hydra(["+launcher=slurm_cpu"]).device == "cpu"
    changed = {k for k in gpu if gpu[k] != cpu[k]}
    assert changed == {"gpus_per_node", "cpus_per_task", "mem_gb", "setup"}


def test_cpu_preset_keys_override_per_sweep():
    conf = OmegaConf.to_container(compose_hydra(["+launcher=slurm_cpu", "hydra.launcher.partition=cpu",
                                                 "hydra.launcher.timeout_min=30"]).hydra.launcher)
    assert conf["partition"] == "cpu" and conf["timeout_min"] == 30


def test_every_submitit_slurm_key_is_documented_in_the_gpu_preset():
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    text = (CONFIG_DIR / "launcher" / "slurm.yaml").read_text()
    documented = {m.group(1) for m in re.finditer(r"^    (\w+):.*#", text, re.M)}
    keys = {f.name for f in dataclasses.fields(SlurmQueueConf)} - {"_target_"}
    assert keys - documented == set()


@pytest.mark.parametrize("preset", [None, "slurm", "slurm_cpu", "local", "joblib"])
def test_every_preset_reports_failed_jobs(preset):
    # None: Hydra's basic launcher (no preset); the callback is in the root hydra config, so every launcher has it.
    callbacks = OmegaConf.to_container(compose_hydra([f"+launcher={preset}"] if preset else []).hydra.callbacks)
    assert {c["_target_"] for c in callbacks.values()} == {TARGET}


# ----------------------------------------------------------------------------------------------- the report


@dataclasses.dataclass
class FakeReturn:
    _return_value: object
    overrides: list
    status: object = None


def job_config(sweep_dir: Path, num: int, mode: str = "MULTIRUN") -> object:
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}, "job": {"num": num, "name": "run"},
                                       "mode": mode, "runtime": {"output_dir": str(sweep_dir / str(num))}}})


def test_a_single_run_is_not_a_job_of_the_report(tmp_path):
    # The callback is in the root Hydra config, so Hydra calls it for single runs too (no hydra.job.num there).
    single = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "job": {"name": "run"}, "mode": "RUN"}})
    FailureReport().on_job_end(single, FakeReturn(JobFailed("bad", True), ["budget=0"]))
    assert not list(tmp_path.rglob("*.json"))


def test_the_report_names_each_failed_job_and_its_error(tmp_path, monkeypatch, capsys):
    from hydra.core.utils import JobStatus

    monkeypatch.delenv(ENV_ID, raising=False)
    report = FailureReport()
    main = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)},
                                       "overrides": {"task": ["model=tiny_llama", "budget=0,64,x"]}}})
    report.on_multirun_start(main)
    assert os.environ[ENV_ID]
    jobs = [(JobFailed("budget=0 must be positive", True), JobStatus.COMPLETED),
            (0.5, JobStatus.COMPLETED),
            (RuntimeError("CUDA out of memory"), JobStatus.FAILED)]
    for num, (value, status) in enumerate(jobs):
        budget = ("0", "64", "x")[num]
        FailureReport().on_job_end(job_config(tmp_path, num),  # a fresh object: jobs run in other processes
                                   FakeReturn(value, ["model=tiny_llama", f"budget={budget}"], status))
    with pytest.raises(SystemExit) as exit_info:
        report.on_multirun_end(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1  # one failure is not a KvbenchError: a bug
    assert "kvbench: 2 of 3 jobs failed:" in err
    assert "job 0 [budget=0]: budget=0 must be positive" in err
    assert "job 2 [budget=x]: RuntimeError: CUDA out of memory" in err
    assert "job 1" not in err and "model=tiny_llama" not in err


def test_the_report_ignores_another_multirun_in_the_same_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV_ID, raising=False)
    main = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": ["budget=0"]}}})
    other = FailureReport()
    other.on_multirun_start(main)
    FailureReport().on_job_end(job_config(tmp_path, 0), FakeReturn(JobFailed("bad", True), ["budget=0"]))
    mine = FailureReport()
    mine.on_multirun_start(main)  # a new id: the first multirun's record is not this one's
    FailureReport().on_job_end(job_config(tmp_path, 0), FakeReturn(0.1, ["budget=0"]))
    mine.on_multirun_end(main)  # nothing failed here: no exit
    assert capsys.readouterr().err == ""
    records = sorted(json.loads(p.read_text())["failed"] for p in tmp_path.rglob("*.json"))
    assert records == [False, True]


def test_a_single_run_keeps_its_one_line_error_and_exit_2(caplog):
    with pytest.raises(SystemExit) as exit_info:
        job_error(KvbenchError("budget=0 must be positive"))
    assert exit_info.value.code == 2
    assert "budget=0 must be positive" in caplog.text
    with pytest.raises(ValueError):  # a bug outside a multirun keeps its traceback
        job_error(ValueError("boom"))


# ----------------------------------------------------------------------------------------------- end to end


def find_longbench() -> Path | None:
    for parent in REPO.parents:
        if (parent / "shared" / "data" / "longbench" / "passage_retrieval_zh.jsonl").exists():
            return parent / "shared" / "data" / "longbench"
    return None


@pytest.mark.launcher
@pytest.mark.parametrize("launcher", [["+launcher=joblib"], [], ["+launcher=local"]],
                         ids=["joblib", "basic", "submitit_local"])
def test_a_failed_job_is_named_when_the_multirun_ends(tmp_path, launcher):
    data = find_longbench()
    if data is None:
        pytest.skip("no shared LongBench files")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    result = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "-m", *launcher, "model=tiny_llama", "method=snapkv",
         "budget=0,48", f"benchmark.data_dir={data}", "benchmark.tasks=[passage_retrieval_zh]",
         "benchmark.limit=1", f"results_root={tmp_path}", f"hydra.sweep.dir={tmp_path}/multirun",
         "progress=false", "device=cpu"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    err = result.stderr
    assert result.returncode == 2, err[-3000:]
    assert "kvbench: 1 of 2 jobs failed:" in err
    assert re.search(r"job 0 \[budget=0\]: budget=0\b", err), err[-3000:]
    assert "Traceback" not in err
    assert json.loads((tmp_path / "tiny_llama" / "longbench" / "snapkv_48" / "run.json").read_text())[
        "status"] == "complete"  # the other job ran to the end
    if launcher == ["+launcher=local"]:  # submitit's job wrapper (as on SLURM): the failed job exits 2 at its end
        failed_log = Path(re.search(r"log: (\S+)", err).group(1)).read_text()
        assert failed_log.rstrip().endswith("exit status 2, so SLURM marks it FAILED")
        good_logs = [p for p in (tmp_path / "multirun" / ".submitit").rglob("*_log.out") if p.read_text() != failed_log]
        assert len(good_logs) == 1 and "the job failed" not in good_logs[0].read_text()


# ----------------------------------------------------------------------------------------------- SLURM (issue 25)
# kvbench's submitit launchers (hydra_plugins/kvbench_launcher, kvbench.slurm) against fake sbatch/sacct/squeue
# programs on PATH: submitit's own code runs unchanged, only the cluster's answers are made up.

FAKE = {
    "sbatch": 'if [ -f "$FAKE_SLURM/sbatch.err" ]; then cat "$FAKE_SLURM/sbatch.err" >&2; exit 1; fi\n'
              'echo "Submitted batch job $(cat "$FAKE_SLURM/sbatch.id")"',
    "sacct": 'echo "JobID|State|NodeList"; cat "$FAKE_SLURM/sacct.out" 2>/dev/null',
    "squeue": 'cat "$FAKE_SLURM/squeue.out" 2>/dev/null',
    "srun": "exit 0",
}
GRES_REFUSED = ("sbatch: error: Invalid generic resource (gres) specification\n"
                "sbatch: error: Batch job submission failed: Invalid generic resource (gres) specification\n")
PARTITION_REFUSED = ("sbatch: error: invalid partition specified: gpu\n"
                     "sbatch: error: Batch job submission failed: Invalid partition name specified\n")


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A folder whose files say what the fake SLURM programs (first on PATH) answer."""
    state = tmp_path / "fake_slurm"
    (state / "bin").mkdir(parents=True)
    for name, body in FAKE.items():
        (state / "bin" / name).write_text(f"#!/bin/sh\n{body}\n")
        (state / "bin" / name).chmod(0o755)
    monkeypatch.setenv("FAKE_SLURM", str(state))
    monkeypatch.setenv("PATH", f"{state / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(ENV_ID, raising=False)
    return state


SWEPT = ["budget=64", "budget=128"]


def slurm_launcher(tmp_path: Path, *extra: str):
    """kvbench's SLURM launcher set up as Hydra sets it up for `run.py -m ... budget=64,128`."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path
    from hydra.types import HydraContext
    from hydra_plugins.kvbench_launcher.submitit_launcher import SlurmLauncher
    from omegaconf import open_dict

    fixed = ["+launcher=slurm", "model=tiny_llama", "method=snapkv", f"results_root={tmp_path / 'results'}",
             f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra]
    cfg = compose_hydra(fixed + ["budget=64"])
    with open_dict(cfg):
        cfg.hydra.overrides.task = fixed + ["budget=64,128"]
        cfg.hydra.job.config_name = "config"
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    launcher = SlurmLauncher(**{k: v for k, v in params.items() if k != "_target_"})
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONFIG_DIR)))
    launcher.setup(hydra_context=HydraContext(config_loader=loader, callbacks=None),
                   task_function=lambda c: None, config=cfg)
    return launcher, cfg, [fixed + [s] for s in SWEPT]


@pytest.mark.parametrize("refusal,fix", [(GRES_REFUSED, "+launcher=slurm_cpu"),
                                         (PARTITION_REFUSED, "hydra.launcher.partition=")])
def test_a_refused_submission_is_one_line_naming_the_fix_and_leaves_no_submitit_folder(
        tmp_path, fake_slurm, capsys, refusal, fix):
    (fake_slurm / "sbatch.err").write_text(refusal)
    launcher, cfg, jobs = slurm_launcher(tmp_path, "hydra.launcher.partition=gpu")
    with pytest.raises(SystemExit) as exit_info:
        launcher.launch(jobs, initial_job_idx=0)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("kvbench: SLURM refused the sweep: "), err
    assert "Batch job submission failed" in err and fix in err and "partition 'gpu'" in err
    assert not (tmp_path / "sweep" / ".submitit").exists()


def write_result(sweep: Path, job_id: str, value: object) -> None:
    """What submitit's job wrapper leaves for the submitter when the job returns `value`."""
    import pickle

    from hydra.core.utils import JobReturn, JobStatus

    folder = sweep / ".submitit" / job_id
    folder.mkdir(parents=True)
    with open(folder / f"{job_id}_0_result.pkl", "wb") as f:
        pickle.dump(("success", JobReturn(status=JobStatus.COMPLETED, _return_value=value)), f)


def test_scancel_ends_the_sweep_with_the_cancelled_jobs_named_and_exit_130(tmp_path, fake_slurm, capsys,
                                                                           monkeypatch):
    from hydra.core.utils import JobStatus
    from submitit.core.core import Job

    monkeypatch.setattr(Job, "_results_timeout_s", 0)  # no result file will come for the cancelled job
    (fake_slurm / "sbatch.id").write_text("4242")
    (fake_slurm / "sacct.out").write_text("4242_0|CANCELLED by 0|node1\n4242_1|COMPLETED|node1\n")
    launcher, cfg, jobs = slurm_launcher(tmp_path)
    report = FailureReport()
    report.on_multirun_start(cfg)
    write_result(tmp_path / "sweep", "4242_1", 0.5)
    FailureReport().on_job_end(job_config(tmp_path / "sweep", 1), FakeReturn(0.5, jobs[1], JobStatus.COMPLETED))
    returns = launcher.launch(jobs, initial_job_idx=0)
    assert [r.return_value for r in returns][1] == 0.5
    assert isinstance(returns[0].return_value, JobFailed) and returns[0].return_value.cancelled
    with pytest.raises(SystemExit) as exit_info:
        report.on_multirun_end(cfg)
    err = capsys.readouterr().err
    assert exit_info.value.code == 130, err
    assert "kvbench: 1 of 2 jobs cancelled:" in err
    assert "job 0 [budget=64]: cancelled (SLURM job 4242_0, CANCELLED by 0)" in err
    assert "Rerun the same command" in err and "Traceback" not in err
    assert "job 1" not in err


def test_ctrl_c_of_the_submitter_names_the_jobs_that_go_on_and_how_to_cancel_them(tmp_path, fake_slurm, capsys,
                                                                                  monkeypatch):
    from submitit.slurm.slurm import SlurmJob

    def interrupted(self):
        raise KeyboardInterrupt

    (fake_slurm / "sbatch.id").write_text("4343")
    monkeypatch.setattr(SlurmJob, "results", interrupted)
    launcher, _, jobs = slurm_launcher(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        launcher.launch(jobs, initial_job_idx=0)
    err = capsys.readouterr().err
    assert exit_info.value.code == 130
    assert err.startswith("kvbench: interrupted, but the SLURM jobs of this sweep go on: 2 not finished "
                          "(4343_0 4343_1)") and "`scancel 4343`" in err, err


def test_the_planner_shows_a_job_squeue_lists_as_pending_not_todo(tmp_path, fake_slurm, monkeypatch):
    from submitit.core.core import Job

    from kvbench.sweep import plan

    monkeypatch.setattr(Job, "_results_timeout_s", 0)
    (fake_slurm / "sbatch.id").write_text("4444")
    (fake_slurm / "sacct.out").write_text("4444_0|CANCELLED|node1\n4444_1|CANCELLED|node1\n")
    launcher, _, jobs = slurm_launcher(tmp_path)
    launcher.launch(jobs, initial_job_idx=0)  # notes which folder each submitted job writes
    sweep = ["model=tiny_llama", "method=snapkv", f"results_root={tmp_path / 'results'}", "budget=64,128"]
    (fake_slurm / "squeue.out").write_text("4444_0 PENDING\n4444_1 RUNNING\n")
    by_budget = {job.cfg.budget: job for job in plan(sweep)[1]}
    assert by_budget[64].status == "pending" and "4444_0" in by_budget[64].note and not by_budget[64].remaining
    assert by_budget[128].status == "running" and not by_budget[128].remaining
    (fake_slurm / "squeue.out").write_text("")  # the jobs left the queue (ran or cancelled): todo again
    assert {job.status for job in plan(sweep)[1]} == {"todo"}


@pytest.mark.parametrize("value,code", [(JobFailed("budget=0 must be positive", True), 2),
                                        (JobFailed("RuntimeError: boom", False), 1), (0.5, None)])
def test_a_failed_submitit_job_exits_non_zero_after_handing_over_its_result(monkeypatch, value, code):
    from hydra.core.utils import JobReturn, JobStatus
    from hydra_plugins.kvbench_launcher.submitit_launcher import SlurmLauncher

    import kvbench.slurm

    ret = JobReturn(status=JobStatus.COMPLETED, _return_value=value)
    exits = []
    plugin_launcher = SlurmLauncher.__mro__[2]  # hydra-submitit-launcher's class, which runs the job
    assert plugin_launcher.__name__ == "BaseSubmititLauncher"
    monkeypatch.setattr(plugin_launcher, "__call__", lambda self, *a, **k: ret)
    monkeypatch.setattr(kvbench.slurm, "exit_after_result", lambda error, c: exits.append((error, c)))
    assert SlurmLauncher().__call__() is ret  # the result still goes to the submitter
    assert exits == ([] if code is None else [(value.error, code)])


def test_the_exit_status_comes_after_the_job_has_finished(tmp_path):
    # The process runs to its end (submitit saves the result there), then exits with the job's status.
    script = ("from kvbench.slurm import exit_after_result\n"
              "exit_after_result('budget=0 must be positive', 2)\n"
              "print('result saved', flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2
    assert done.stdout == "result saved\n"
    assert "the job failed (budget=0 must be positive); exit status 2, so SLURM marks it FAILED" in done.stderr
