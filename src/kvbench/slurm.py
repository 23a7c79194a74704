"""SLURM sweeps as a user sees them: what kvbench's submitit launchers (hydra_plugins/kvbench_launcher, the
`+launcher=slurm`, `slurm_cpu` and `local` presets) say and do where hydra-submitit-launcher alone would end in a
traceback or in silence.

- A job that fails hands its one-line error to the submitter (kvbench.multirun), then exits non-zero (2 bad
  input, 1 a bug), so SLURM marks it FAILED.
- A submission sbatch refuses (a GPU on a CPU-only partition, an unknown partition) is one line naming the cause
  and the fix, exit 2, and leaves no `.submitit` folder behind.
- Jobs cancelled (`scancel`) or ended by SLURM without a result are named in the sweep's report (exit 130 when
  they were only cancelled: rerun the same command to resume them).
- Ctrl-C of the submitting command says which jobs go on and how to cancel them (exit 130).
- Each submitted job is noted under `<results_root>/.multirun/slurm_jobs/` (its result folder), so that
  `python -m kvbench.sweep plan` shows a job that squeue still lists as pending (or running), not as todo.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable

log = logging.getLogger("kvbench")

EXIT_INTERRUPTED = 130
QUEUED = Path(".multirun") / "slurm_jobs"  # under results_root: one JSON file per submitted job
# squeue states of a job that will still write its result folder
WAITING = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}
ACTIVE = WAITING | {"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING"}


def fail(message: str, code: int = 2) -> None:
    """The submitter's one-line answer: `kvbench: <message>` on stderr and the exit status."""
    print(f"kvbench: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------- in the job


def exit_after_result(error: str, code: int) -> None:
    """Make this (submitit) job's process exit with `code` once submitit has saved its result for the submitter,
    so that SLURM marks the job FAILED; its log ends with the reason."""
    def leave() -> None:
        log.error("kvbench: the job failed (%s); exit status %d, so SLURM marks it FAILED", error, code)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    atexit.register(leave)


# ----------------------------------------------------------------------------------------------- submission


def submission_error(message: str, partition: str | None) -> str:
    """sbatch's refusal (its stderr) as one line: the cause and the fix."""
    said = [line.strip().removeprefix("sbatch: error:").strip() for line in message.strip().splitlines()]
    said = list(dict.fromkeys(line for line in said if line))
    reason = "; ".join(said[-2:]) or "sbatch failed without a message"
    low = reason.lower()
    where = f"partition {partition!r}" if partition else "the cluster's default partition"
    if "partition" in low:
        fix = (f"set hydra.launcher.partition= to a partition `sinfo -s` lists (now {where}; "
               "null: the cluster's default)")
    elif "gres" in low or "gpu" in low:
        fix = (f"the GPU preset asks each job for a GPU and {where} has none: on CPU-only nodes use "
               "+launcher=slurm_cpu, or name a GPU partition with hydra.launcher.partition=")
    elif "account" in low or "association" in low:
        fix = "set hydra.launcher.account= to an account of yours (`sacctmgr show assoc user=$USER`)"
    elif "qos" in low:
        fix = "set hydra.launcher.qos= to a QOS your account may use (or null)"
    elif "node configuration" in low or "memory" in low or "cpu" in low:
        fix = (f"no node of {where} has what a job asks for: lower hydra.launcher.mem_gb / cpus_per_task / "
               "gpus_per_node (`sinfo -o '%P %c %m %G'` lists the nodes), or pick another partition")
    elif "time limit" in low:
        fix = f"lower hydra.launcher.timeout_min to the limit of {where} (`sinfo -o '%P %l'`)"
    else:
        fix = "see configs/launcher/slurm.yaml for the keys to change (hydra.launcher.KEY=VALUE)"
    return f"SLURM refused the sweep: {reason}. Fix: {fix}"


def remove_if_new(folder: Path, existed: bool) -> None:
    """After a refused submission: remove the submitit folder this launch created (job pickles, sbatch file)."""
    if not existed and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- waiting


def lost_job(state: str, job_id: str) -> tuple[str, bool, bool]:
    """(error, user_error, cancelled) of a job that ended without a result, from its SLURM state."""
    word = (state or "UNKNOWN").split()[0]
    if word == "CANCELLED":
        return f"cancelled (SLURM job {job_id}, {state})", True, True
    hints = {"TIMEOUT": "raise hydra.launcher.timeout_min or hydra.launcher.max_num_timeout",
             "OUT_OF_MEMORY": "raise hydra.launcher.mem_gb",
             "DEADLINE": "raise the deadline or hydra.launcher.timeout_min"}
    if word in hints:
        return f"SLURM ended it without a result ({state}, job {job_id}); {hints[word]}", True, False
    return f"SLURM ended it without a result ({state}, job {job_id}); see its log", False, False


def interrupted(job_ids: list[str], scheduler: str) -> str:
    """What Ctrl-C of the submitter leaves behind, and how to end it."""
    if not job_ids:
        return "interrupted: every job had already finished; rerun the same command for the report"
    if scheduler != "slurm":  # submitit's local jobs are this command's children: Ctrl-C reached them too
        return "interrupted; rerun the same command to resume (finished runs are skipped, partial ones resume)"
    arrays = " ".join(dict.fromkeys(j.split("_")[0] for j in job_ids))
    return (f"interrupted, but the SLURM jobs of this sweep go on: {len(job_ids)} not finished "
            f"({' '.join(job_ids)}). Cancel them with `scancel {arrays}`, or let them run: "
            "`python -m kvbench.sweep plan ...` shows them as pending/running; rerun the same command once they "
            "end (finished runs are skipped, partial ones resume)")


# ----------------------------------------------------------------------------------------------- the planner


def note_submitted(results_root: str | Path, job_id: str, out: str | Path) -> None:
    """Note that SLURM job `job_id` will write result folder `out` (read by queued_jobs)."""
    folder = Path(results_root) / QUEUED
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{job_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"job": job_id, "out": os.path.abspath(out)}))
    os.replace(tmp, folder / f"{job_id}.json")


def squeue_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """{job id: state} of the given jobs that squeue lists (array tasks one by one); None without squeue."""
    wanted = set(job_ids)
    if not wanted or shutil.which("squeue") is None:
        return None
    try:
        done = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-u", str(os.getuid())],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    states = dict(line.split(None, 1) for line in done.stdout.splitlines() if len(line.split()) == 2)
    return {job: state.strip() for job, state in states.items() if job in wanted}


def queued_jobs(results_root: str | Path) -> dict[str, tuple[str, str]]:
    """{absolute result folder: (job id, squeue state)} of the noted jobs that squeue still lists as waiting or
    running; notes of jobs squeue no longer lists are removed. Empty where squeue is not available."""
    folder = Path(results_root) / QUEUED
    notes = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            note = json.loads(path.read_text())
            notes[str(note["job"])] = (path, str(note["out"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    states = squeue_states(notes)
    if states is None:
        return {}
    found = {}
    for job, (path, out) in notes.items():
        state = states.get(job)
        if state in ACTIVE:
            found[out] = (job, state)
        else:
            try:
                path.unlink()
            except OSError:  # gone already, or a read-only results root
                pass
    return found
