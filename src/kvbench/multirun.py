"""Multirun job errors that reach the user: every failed job named, with its one-line error, when the sweep ends.

A job of a Hydra multirun runs in another process (a SLURM job, a submitit or joblib worker). There, run.py's
single-run answer to an error, one line and `sys.exit(2)`, reaches nobody: SLURM reports "exit code 2", submitit
finds no result and (without accounting) waits for it forever. Under a multirun whose config lists the
`FailureReport` callback (the root Hydra config `configs/hydra/default.yaml` lists it, so every launcher has it), a job instead logs its error (its log has it),
returns a `JobFailed` (so the launcher gets a result and the other jobs go on), and the callback records one line
per job under the sweep folder. When the multirun ends, the callback prints the failed jobs, their overrides and
errors and where their logs are, and exits with status 2 (1 where an error was not a KvbenchError, i.e. a bug).
A job that ended without a result (a SLURM job cancelled with scancel: kvbench.slurm records it for the job) is
named too; when every such job was only cancelled, the status is 130 (interrupted: rerun the same command).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kvbench.errors import KvbenchError

log = logging.getLogger("kvbench")

TARGET = "kvbench.multirun.FailureReport"
ENV_ID = "KVBENCH_MULTIRUN_ID"
RECORDS = ".kvbench_jobs"  # inside hydra.sweep.dir: one folder per multirun, one JSON file per job


@dataclass(frozen=True)
class JobFailed:
    """What a failed job of a reporting multirun returns in place of its score."""

    error: str            # one line: the KvbenchError's message, or "<ExceptionType>: <message>" for a bug
    user_error: bool      # True for a KvbenchError (bad input, fixable by the user)
    cancelled: bool = False  # the job was cancelled (scancel) before it ended: the same command resumes it

    def __str__(self) -> str:
        return self.error


def reporting_multirun() -> bool:
    """True inside a job of a Hydra multirun whose config lists the FailureReport callback."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return False
    return any(c.get("_target_") == TARGET for c in (hydra_cfg.callbacks or {}).values())


def job_error(err: Exception) -> JobFailed:
    """run.py's answer to an error. A KvbenchError is logged as one line. Then: inside a reporting multirun,
    return a JobFailed (a bug's traceback goes to the job's log); otherwise exit 2 (KvbenchError) or re-raise."""
    user_error = isinstance(err, KvbenchError)
    if user_error:
        log.error("%s", err)
    if not reporting_multirun():
        if user_error:
            sys.exit(2)
        raise err
    if not user_error:
        log.error("the job failed", exc_info=err)
    text = str(err) if user_error else f"{type(err).__name__}: {err}"
    return JobFailed(" ".join(text.split()) or type(err).__name__, user_error)


def _job_log(config: DictConfig) -> str | None:
    """The job's own log: submitit's stdout file on SLURM/submitit (Hydra logs to stdout), else Hydra's job log."""
    try:
        import submitit

        return str(submitit.JobEnvironment().paths.stdout)
    except Exception:  # noqa: BLE001 - not a submitit job
        pass
    try:
        path = Path(config.hydra.runtime.output_dir) / f"{config.hydra.job.name}.log"
        return str(path) if path.exists() else None
    except Exception:  # noqa: BLE001 - no runtime output dir
        return None


def _records(config: DictConfig, multirun_id: str) -> Path:
    return Path(str(config.hydra.sweep.dir)) / RECORDS / multirun_id


def _swept_keys(overrides: list[str]) -> set[str]:
    """Keys the multirun sweeps (`method=a,b`), as written (with any +/~ prefix)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - then every override names the job
        return set()
    return {o.input_line.split("=", 1)[0] for o in parsed if o.is_sweep_override()}


def job_outcome(job_return: Any) -> Any:
    """A job's return value, a JobFailed where Hydra caught an exception (the property would re-raise it)."""
    from hydra.core.utils import JobStatus

    value = job_return._return_value
    if job_return.status == JobStatus.FAILED:
        return JobFailed(f"{type(value).__name__}: {value}", isinstance(value, KvbenchError))
    return value


def record_job(config: DictConfig, num: int, overrides: list[str], value: Any, job_log: str | None) -> None:
    """Write job `num`'s outcome where the multirun's FailureReport reads it (the job itself, or the launcher
    for a job that ended without a result)."""
    record = {"num": num, "overrides": list(overrides), "failed": isinstance(value, JobFailed), "log": job_log}
    if isinstance(value, JobFailed):
        record.update(error=value.error, user_error=value.user_error, cancelled=value.cancelled)
    folder = _records(config, os.environ.get(ENV_ID, "untagged"))
    folder.mkdir(parents=True, exist_ok=True)
    # A requeued job writes its record again: one file per job number, replaced atomically.
    tmp = folder / f".{num}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f"{num}.json")


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra < 1.1
    Callback = object  # type: ignore[misc,assignment]


class FailureReport(Callback):
    """Hydra callback (hydra.callbacks): records each job's outcome, prints the failed ones at the multirun's end."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        os.environ[ENV_ID] = uuid.uuid4().hex[:12]  # inherited by the jobs (sbatch exports the environment)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        mode = config.hydra.get("mode")
        if getattr(mode, "name", mode) != "MULTIRUN":  # a single run answers its own errors (run.py)
            return
        record_job(config, int(config.hydra.job.num), job_return.overrides or [], job_outcome(job_return),
                   _job_log(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        records = self._read(config)
        failed = sorted((r for r in records if r["failed"]), key=lambda r: r["num"])
        if not failed:
            return
        cancelled = sum(bool(r.get("cancelled")) for r in failed)
        errors = len(failed) - cancelled
        swept = _swept_keys(list(config.hydra.overrides.task))  # a job is named by its values on the swept keys
        head = f"{errors} of {len(records)} jobs failed" if errors else f"{cancelled} of {len(records)} jobs cancelled"
        lines = [f"kvbench: {head}{f', {cancelled} cancelled' if errors and cancelled else ''}:"]
        for rec in failed:
            own = [o for o in rec["overrides"] if o.split("=", 1)[0] in swept]
            name = f"job {rec['num']} [{' '.join(own)}]" if own else f"job {rec['num']}"  # nothing swept: the command
            lines.append(f"  {name}: {rec['error']}")
            if rec.get("log"):
                lines.append(f"      log: {rec['log']}")
        lines.append(("Fix the cause and rerun" if errors else "Rerun") +
                     " the same command: finished runs are skipped, partial ones resume.")
        print("\n".join(lines), file=sys.stderr, flush=True)
        if not errors:
            sys.exit(130)  # interrupted, as a single run's Ctrl-C
        sys.exit(2 if all(r.get("user_error") for r in failed) else 1)

    def _read(self, config: DictConfig) -> list[dict]:
        found = []
        mine = _records(config, os.environ.get(ENV_ID, "untagged"))
        untagged = _records(config, "untagged")  # jobs that did not inherit the environment (sbatch --export)
        for folder in dict.fromkeys([mine, untagged]):
            for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
                if folder == untagged and path.stat().st_mtime < self.started:
                    continue
                try:
                    found.append(json.loads(path.read_text()))
                except (OSError, json.JSONDecodeError):
                    continue
        return found
