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
@pytest.mark.parametrize("launcher", [["+launcher=joblib"], []], ids=["joblib", "basic"])
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
