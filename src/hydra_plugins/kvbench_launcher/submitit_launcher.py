"""hydra-submitit-launcher's SLURM and local launchers with kvbench's answers (kvbench.slurm): a failed job exits
non-zero, a refused submission is one line, cancelled jobs are reported, Ctrl-C names the jobs that go on.
configs/launcher/slurm.yaml and local.yaml select them (`hydra.launcher._target_`)."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

try:  # the [slurm] extra; without it these launchers do not exist (as hydra-submitit-launcher's)
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _base
except ImportError:  # pragma: no cover - hydra-submitit-launcher not installed
    _base = None

if _base is not None:
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobReturn, JobStatus, filter_overrides
    from omegaconf import OmegaConf

    class _Kvbench(_base.BaseSubmititLauncher):
        def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
            """In the job: run it; a failure goes to the submitter as a result, then the job exits non-zero."""
            from kvbench.multirun import JobFailed, job_outcome
            from kvbench.slurm import exit_after_result

            ret = super().__call__(*args, **kwargs)
            value = job_outcome(ret)
            if isinstance(value, JobFailed):
                exit_after_result(value.error, 2 if value.user_error else 1)
            return ret

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import submitit
            from submitit.core.utils import FailedJobError, FailedSubmissionError, JobPaths, UncompletedJobError

            from kvbench import slurm

            assert self.config is not None and self.hydra_context is not None
            if self._EXECUTOR == "slurm" and shutil.which("sbatch") is None:
                slurm.fail("no SLURM here (sbatch not found): submit from a login node of the cluster, or run the "
                           "sweep on this machine with +launcher=joblib (or no +launcher)")
            params = dict(self.params)
            folder = params.pop("submitit_folder")
            init = {f"{self._EXECUTOR}_max_num_timeout": params.pop("max_num_timeout")} \
                if "max_num_timeout" in params else {}
            executor = submitit.AutoExecutor(folder=folder, cluster=self._EXECUTOR, **init)
            common = set(OmegaConf.structured(_base.BaseQueueConf).keys())
            executor.update_parameters(**{k if k in common else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            _base.log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
            nums = range(initial_job_idx, initial_job_idx + len(job_overrides))
            for num, overrides in zip(nums, job_overrides):
                _base.log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            fixed = JobPaths.get_first_id_independent_folder(folder)  # where submitit writes first
            existed = fixed.exists()
            said = io.StringIO()
            try:
                with contextlib.redirect_stderr(said):  # submitit prints sbatch's stderr: it goes into our line
                    jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(nums),
                                              list(nums), [f"job_id_for_{n}" for n in nums],
                                              [Singleton.get_state()] * len(nums))
            except (FailedJobError, FailedSubmissionError) as err:
                slurm.remove_if_new(fixed, existed)
                slurm.fail(slurm.submission_error(str(err) or said.getvalue(), params.get("partition")))
            if self._EXECUTOR == "slurm":
                self._note(jobs, job_overrides)
            returns: list[JobReturn] = []
            try:
                for num, job, overrides in zip(nums, jobs, job_overrides):
                    try:
                        returns.append(job.results()[0])
                    except (UncompletedJobError, FailedJobError) as err:
                        returns.append(self._lost(num, job, list(overrides), err))
            except KeyboardInterrupt:
                left = [j.job_id for j in jobs if not j.paths.result_pickle.exists()]
                slurm.fail(slurm.interrupted(left, self._EXECUTOR), slurm.EXIT_INTERRUPTED)
            return returns

        def _lost(self, num: int, job: Any, overrides: list[str], err: Exception) -> JobReturn:
            """A job that ended without a result (cancelled, killed by SLURM) or whose submitit wrapper raised: a
            result for the sweep's report in place of submitit's traceback."""
            from submitit.core.utils import FailedJobError

            from kvbench.multirun import JobFailed, record_job
            from kvbench.slurm import lost_job

            if isinstance(err, FailedJobError):  # raised outside kvbench's own handling: a bug, traceback in the log
                trace = str(err).split("-" * 22)  # submitit's message frames the job's traceback with dashes
                last = [line for line in (trace[1] if len(trace) > 2 else str(err)).splitlines() if line.strip()]
                failed = JobFailed(f"the job raised {last[-1].strip() if last else type(err).__name__}", False)
            else:
                failed = JobFailed(*lost_job(job.state, job.job_id))
            record_job(self.config, num, overrides, failed, str(job.paths.stdout))
            return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=failed)

        def _note(self, jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]]) -> None:
            """Note each job's result folder, for `kvbench.sweep plan` (pending jobs); a job whose config does not
            compose is skipped (it fails on its own, with its error in the sweep's report)."""
            from kvbench.config import output_dir
            from kvbench.slurm import note_submitted

            for job, overrides in zip(jobs, job_overrides):
                try:
                    cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                    note_submitted(cfg.results_root, job.job_id, output_dir(cfg))
                except Exception:  # noqa: BLE001 - the note only informs the planner
                    continue

    class SlurmLauncher(_Kvbench):
        _EXECUTOR = "slurm"

    class LocalLauncher(_Kvbench):
        _EXECUTOR = "local"
