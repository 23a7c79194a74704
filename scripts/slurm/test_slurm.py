#!/usr/bin/env python
"""`make test-slurm`: kvbench's sweeps on a real single-node SLURM cluster, as a cluster user runs them.

As root on Debian/Ubuntu it installs SLURM from the distribution (`slurm-wlm munge slurmdbd mariadb-server`, once),
starts munged, MariaDB, slurmdbd, slurmctld and slurmd from a temporary folder (scripts/slurm/cluster.py), runs
tiny-model sweeps through `+launcher=slurm_cpu` and checks:

  results     a 2-job sweep becomes one job array; both result folders complete, each sample once; sacct has it
  rerun       the sweep planner submits nothing for a finished sweep; `run.py -m` again leaves every file as it was
  command     run.json's `command` is the user's overrides, not the submitit worker's command line
  failure     a sweep with a bad job ends, naming that job and its one-line error; the job's log has it too;
              sacct marks the bad job FAILED (exit code 2), the good one COMPLETED
  refused     sbatch refuses a sweep (the GPU preset on this CPU-only cluster, an unknown partition): one line
              naming the fix, exit 2, no .submitit folder left
  concurrent  the same sweep submitted twice at once: the planner skips the folder a live job holds; no duplicate
  scancel     a job cancelled mid-run ends the sweep naming it, exit 130; the same command again resumes it,
              each sample once
  interrupt   a job still pending is `pending` in the planner; Ctrl-C of the submitter names it and how to cancel
              it (exit 130), and the job stays queued
  requeue     a job signalled as timed out (what SLURM sends before the time limit) is requeued and resumes
  noacct      on a second cluster without accounting (no sacct), a failing job's sweep still ends, naming it

then stops every daemon it started, by PID. Exit status: 0 all passed, 1 a check failed, 3 SLURM could not be
installed or started (the message says why).

    sudo make test-slurm                         # or: python scripts/slurm/test_slurm.py [--keep] [--only a,b]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Cluster, ClusterError, install  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CHECKS = ("results", "rerun", "command", "failure", "refused", "concurrent", "scancel", "interrupt", "requeue",
          "noacct")
# Checks that rely on issue 17's items 1, 3, 4 (folder lock and planner, run records, command): see the report.
NEEDS = {"rerun": "17.3", "command": "17.4", "concurrent": "17.1", "scancel": "17.3"}


def find_longbench() -> Path | None:
    if os.environ.get("KVBENCH_LONGBENCH_DIR"):
        return Path(os.environ["KVBENCH_LONGBENCH_DIR"])
    for parent in REPO.parents:
        candidate = parent / "shared" / "data" / "longbench"
        if (candidate / "passage_retrieval_zh.jsonl").exists():
            return candidate
    return None


class Failed(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


class Harness:
    def __init__(self, cluster: Cluster, data: Path, work: Path) -> None:
        self.cluster = cluster
        self.data = data
        self.work = work
        self.results = work / "results"
        self.sweeps = 0

    # ------------------------------------------------------------------------------------------- running

    def env(self) -> dict[str, str]:
        env = self.cluster.env()
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                                   else []))
        env["OMP_NUM_THREADS"] = "1"
        env["HYDRA_FULL_ERROR"] = "0"
        return env

    def overrides(self, *extra: str, tasks: str = "[passage_retrieval_zh]") -> list[str]:
        return ["+launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                "hydra.launcher.timeout_min=20", "model=tiny_llama", f"benchmark.data_dir={self.data}",
                f"benchmark.tasks={tasks}", f"results_root={self.results}", "progress=false", *extra]

    def start(self, args: list[str], module: str | None = None) -> subprocess.Popen:
        self.sweeps += 1
        head = [sys.executable, "-m", module] if module else [sys.executable, str(REPO / "run.py"), "-m"]
        if not module:
            args = args + [f"hydra.sweep.dir={self.work / 'multirun' / str(self.sweeps)}"]
        log = open(self.work / f"sweep{self.sweeps}.log", "w+")
        # SIGINT as a terminal delivers it, even where this harness runs in the background (which ignores it)
        proc = subprocess.Popen(head + args, cwd=self.work, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        proc.log = log  # type: ignore[attr-defined]
        proc.cmd = " ".join(head[1:] + args)  # type: ignore[attr-defined]
        return proc

    def finish(self, proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        proc.log.seek(0)  # type: ignore[attr-defined]
        text = proc.log.read()  # type: ignore[attr-defined]
        proc.log.close()  # type: ignore[attr-defined]
        if code is None:
            raise Failed(f"still running after {timeout:.0f} s (killed): {proc.cmd}\n{tail(text)}")  # type: ignore
        return code, text

    def sweep(self, args: list[str], timeout: float = 600, module: str | None = None) -> tuple[int, str]:
        return self.finish(self.start(args, module), timeout)

    # ------------------------------------------------------------------------------------------- inspecting

    def folder(self, run: str) -> Path:
        return self.results / "tiny_llama" / "longbench" / run

    def jobs(self) -> list[str]:
        """squeue: 'jobid state' of every job in the queue."""
        return self.cluster.run(["squeue", "-h", "-o", "%i %T"]).stdout.split("\n")[:-1]

    def accounted(self) -> list[list[str]]:
        out = self.cluster.run(["sacct", "-a", "-n", "-X", "-P", "-S", "now-2hours", "-o",
                                "JobID,JobName,State,ExitCode"]).stdout
        return [line.split("|") for line in out.splitlines() if line.strip()]

    def wait_for_lines(self, path: Path, proc: subprocess.Popen, lines: int = 1, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if path.exists() and len(path.read_text().splitlines()) >= lines:
                return
            if proc.poll() is not None:
                code, out = self.finish(proc)
                raise Failed(f"the sweep ended (exit {code}) before its first prediction:\n{tail(out)}")
            time.sleep(0.2)
        raise Failed(f"no prediction in {path} after {timeout:.0f} s; queue: {self.jobs()}")

    # ------------------------------------------------------------------------------------------- checks

    def check_results(self) -> str:
        code, out = self.sweep(self.overrides("method=snapkv,streamingllm", "budget=64", "benchmark.limit=2",
                                              tasks="[passage_retrieval_zh,multifieldqa_zh]"))
        expect(code == 0, f"the sweep failed (exit {code}):\n{tail(out)}")
        for run in ("snapkv_64", "streamingllm_64"):
            assert_complete(self.folder(run), {"passage_retrieval_zh": 2, "multifieldqa_zh": 2})
        tasks = sorted(p.name for p in (self.work / "multirun" / str(self.sweeps) / ".submitit").iterdir()
                       if re.fullmatch(r"\d+_\d+", p.name))
        arrays = {t.split("_")[0] for t in tasks}
        expect(len(tasks) == 2 and len(arrays) == 1, f"expected one job array of 2 tasks, got {tasks}")
        array = arrays.pop()
        deadline = time.time() + 30  # slurmctld reports to slurmdbd asynchronously
        while True:
            rows = [r for r in self.accounted() if r[0].startswith(array + "_")]
            if len(rows) == 2 and all(r[2] == "COMPLETED" for r in rows) or time.time() > deadline:
                break
            time.sleep(1)
        expect(len(rows) == 2 and all(r[2] == "COMPLETED" for r in rows), f"sacct for array {array}: {rows}")
        return f"array {array}: 2 jobs COMPLETED in sacct, 2 folders x 2 tasks x 2 samples"

    def _results_args(self) -> list[str]:
        return self.overrides("method=snapkv,streamingllm", "budget=64", "benchmark.limit=2",
                              tasks="[passage_retrieval_zh,multifieldqa_zh]")

    def check_rerun(self) -> str:
        folders = [self.folder("snapkv_64"), self.folder("streamingllm_64")]
        expect(all((f / "run.json").exists() for f in folders), "needs the `results` check's folders")
        before = snapshot(folders)
        queued = len(self.accounted())
        code, out = self.sweep(["run", *self._results_args()], module="kvbench.sweep")
        expect(code == 0 and "nothing to run" in out, f"kvbench.sweep run did not skip (exit {code}):\n{tail(out)}")
        expect(len(self.accounted()) == queued, "kvbench.sweep submitted a job for a finished sweep")
        code, out = self.sweep(self._results_args())
        expect(code == 0, f"the rerun through run.py -m failed (exit {code}):\n{tail(out)}")
        after = snapshot(folders)
        changed = sorted(str(p.relative_to(self.results)) for p in set(before) | set(after)
                         if before.get(p) != after.get(p))
        expect(not changed, f"a rerun of finished jobs changed {changed} (needs 17.3: run.json left as it was)")
        return "kvbench.sweep: nothing to run, no job submitted; run.py -m again: every file byte-identical"

    def check_command(self) -> str:
        record = json.loads((self.folder("snapkv_64") / "run.json").read_text())
        command = record.get("command")
        text = command if isinstance(command, str) else json.dumps(command)
        expect(text is not None and "method=snapkv" in text and "budget=64" in text and "submitit" not in text,
               f"run.json command is {command!r}: expected the user's overrides (needs 17.4)")
        return f"command: {text[:120]}"

    def check_failure(self) -> str:
        started = time.time()
        code, out = self.sweep(self.overrides("method=snapkv", "budget=0,48", "benchmark.limit=1"), timeout=600)
        took = time.time() - started
        expect(code != 0, f"a sweep with a failing job exited 0:\n{tail(out)}")
        line = re.search(r"job \d+ \[budget=0\]: (.+)", out)
        expect(line is not None and "budget=0" in line.group(1),
               f"the failing job and its error are not in the multirun's output:\n{tail(out)}")
        expect("1 of 2 jobs failed" in out, f"no failure count in the output:\n{tail(out)}")
        expect("Traceback" not in out, f"a traceback in the multirun output:\n{tail(out)}")
        log = re.search(r"log: (\S+)", out)
        expect(log is not None and Path(log.group(1)).exists(), f"no job log named in:\n{tail(out)}")
        expect(line.group(1).strip() in Path(log.group(1)).read_text(),
               f"the job log {log.group(1)} lacks the error")
        assert_complete(self.folder("snapkv_48"), {"passage_retrieval_zh": 1})
        array = Path(log.group(1)).parent.name.split("_")[0]
        deadline = time.time() + 30  # slurmctld reports to slurmdbd asynchronously
        while True:
            states = {r[0]: (r[2], r[3]) for r in self.accounted() if r[0].startswith(array + "_")}
            if len(states) == 2 and "RUNNING" not in str(states) or time.time() > deadline:
                break
            time.sleep(1)
        failed = line.group(0).split()[1]  # "job 0 [budget=0]: ..." -> its array task
        expect(states.get(f"{array}_{failed}") == ("FAILED", "2:0"),
               f"sacct should mark the failed job FAILED with exit code 2:0, not {states}")
        expect([v for k, v in states.items() if k != f"{array}_{failed}"] == [("COMPLETED", "0:0")],
               f"sacct for the good job: {states}")
        return f"ended in {took:.0f} s, exit {code}: {line.group(0).strip()}; sacct: {states}"

    def check_refused(self) -> str:
        found = []
        cpu = self.overrides("method=snapkv", "budget=48,64")
        gpu = ["+launcher=slurm" if a == "+launcher=slurm_cpu" else a for a in cpu]  # the GPU preset, no GPU here
        for args, fix in ((gpu, "+launcher=slurm_cpu"),
                          (cpu + ["hydra.launcher.partition=nosuchpartition"], "hydra.launcher.partition=")):
            code, out = self.sweep(args, timeout=120)
            lines = [line for line in out.splitlines() if line.strip() and "[HYDRA]" not in line]
            expect(code == 2 and len(lines) == 1 and lines[0].startswith("kvbench: SLURM refused the sweep")
                   and fix in lines[0], f"expected one line naming {fix}, exit 2; got exit {code}:\n{tail(out)}")
            submitit = self.work / "multirun" / str(self.sweeps) / ".submitit"
            expect(not submitit.exists(), f"{submitit} was left behind: {list(submitit.rglob('*'))}")
            found.append(lines[0][len("kvbench: SLURM refused the sweep: "):][:70])
        return " | ".join(found)

    def check_noacct(self) -> str:
        expect(not self.cluster.accounting, "runs on the cluster without accounting")
        started = time.time()
        code, out = self.sweep(self.overrides("method=snapkv", "budget=0"), timeout=300)
        expect(code == 2 and re.search(r"job 0: budget=0\b", out) is not None,
               f"exit {code}, output:\n{tail(out)}")
        return f"ended in {time.time() - started:.0f} s without sacct, exit {code}, the job's error named"

    def check_concurrent(self, samples: int = 16) -> str:
        args = self.overrides("method=h2o", "budget=64", f"benchmark.limit={samples}")
        first, second = self.start(args), self.start(args)
        predictions = self.folder("h2o_64") / "predictions" / "passage_retrieval_zh.jsonl"
        self.wait_for_lines(predictions, first)
        plan_code, plan = self.sweep(["plan", "--dry-run", *args], module="kvbench.sweep")
        (code1, out1), (code2, out2) = self.finish(first), self.finish(second)
        lines = predictions.read_text().splitlines()
        ids = [json.loads(line)["_id"] for line in lines]
        problems = []
        if len(ids) != len(set(ids)):
            problems.append(f"{len(ids)} prediction lines for {len(set(ids))} ids (needs 17.1: the folder lock)")
        scores = json.loads((self.folder("h2o_64") / "scores.json").read_text()) \
            if (self.folder("h2o_64") / "scores.json").exists() else {}
        if scores.get("n", {}).get("passage_retrieval_zh") not in (None, len(set(ids))):
            problems.append(f"scores.json n={scores['n']['passage_retrieval_zh']} for {len(set(ids))} samples")
        if plan_code != 0 or "would run:" in plan and "method=h2o" in plan.split("would run:", 1)[1]:
            problems.append(f"while a job held the folder the planner would submit it again (needs 17.1):\n"
                            f"{tail(plan, 6)}")
        codes = [code1, code2]
        for code, out in ((code1, out1), (code2, out2)):
            if code != 0 and not re.search(r"lock|held|in use|another run|running", out, re.I):
                problems.append(f"a submission failed without naming the lock (exit {code}):\n{tail(out)}")
        expect(sum(c == 0 for c in codes) >= 1, f"neither submission finished: exits {codes}")
        expect(not problems, "\n".join(problems))
        assert_complete(self.folder("h2o_64"), {"passage_retrieval_zh": samples})
        return f"exits {codes}; {len(ids)} lines, {len(set(ids))} unique ids; planner skipped the held folder"

    def check_scancel(self, samples: int = 20) -> str:
        args = self.overrides("method=pyramidkv", "budget=64", f"benchmark.limit={samples}")
        predictions = self.folder("pyramidkv_64") / "predictions" / "passage_retrieval_zh.jsonl"
        proc = self.start(args)
        self.wait_for_lines(predictions, proc)
        running = [j.split()[0] for j in self.jobs() if j.endswith("RUNNING")]
        expect(len(running) == 1, f"expected one running job, queue: {self.jobs()}")
        self.cluster.run(["scancel", running[0].split("_")[0]])
        cancelled, out = self.finish(proc, timeout=180)
        done_before = len(predictions.read_text().splitlines())
        expect(cancelled == 130 and "Traceback" not in out and "1 of 1 jobs cancelled" in out
               and re.search(r"job 0: cancelled \(SLURM job \d+, CANCELLED", out) is not None,  # one job: no array
               f"the cancelled sweep should name the cancelled job and exit 130 (exit {cancelled}):\n{tail(out)}")
        expect(done_before < samples, f"the job finished ({done_before} samples) before it was cancelled")
        code, out = self.sweep(args)
        expect(code == 0, f"the resubmitted sweep failed (exit {code}):\n{tail(out)}")
        assert_complete(self.folder("pyramidkv_64"), {"passage_retrieval_zh": samples})
        record = json.loads((self.folder("pyramidkv_64") / "run.json").read_text())
        sessions = record.get("sessions")
        expect(isinstance(sessions, list) and len(sessions) >= 2,
               f"run.json has no per-session entries after a resume (needs 17.3): sessions={sessions!r}")
        return f"cancelled after {done_before}/{samples} samples (sweep exit {cancelled}); resubmitted: {samples} " \
               f"unique, " \
               f"{len(sessions)} sessions"

    def check_interrupt(self) -> str:
        args = self.overrides("method=h2o", "budget=48", "benchmark.limit=1",
                              "+hydra.launcher.additional_parameters.begin=now+3600")  # pending for an hour
        proc = self.start(args)
        deadline = time.time() + 120
        while not any(j.endswith("PENDING") for j in self.jobs()) and time.time() < deadline:
            if proc.poll() is not None:
                code, out = self.finish(proc)
                raise Failed(f"the sweep ended (exit {code}) before its job was queued:\n{tail(out)}")
            time.sleep(0.5)
        pending = [j.split()[0] for j in self.jobs() if j.endswith("PENDING")]
        expect(len(pending) == 1, f"expected one pending job, queue: {self.jobs()}")
        plan_code, plan = self.sweep(["plan", "--dry-run", *args], module="kvbench.sweep")
        expect(plan_code == 0 and re.search(r"\bpending\b.*h2o_48", plan) is not None and "nothing to run" in plan,
               f"the planner should show the queued job as pending (exit {plan_code}):\n{tail(plan)}")
        time.sleep(2)  # the submitter is waiting for the job
        proc.send_signal(signal.SIGINT)
        code, out = self.finish(proc, timeout=60)
        expect(code == 130 and pending[0] in out and f"scancel {pending[0].split('_')[0]}" in out
               and "Traceback" not in out, f"Ctrl-C should name the job and how to cancel it (exit {code}):\n"
                                            f"{tail(out)}")
        expect(pending[0] + " PENDING" in self.jobs(), f"the job left the queue after Ctrl-C: {self.jobs()}")
        self.cluster.run(["scancel", pending[0].split("_")[0]])
        return f"planner: pending; Ctrl-C: exit 130, `scancel {pending[0].split('_')[0]}` named; the job stayed queued"

    def check_requeue(self, samples: int = 20) -> str:
        # timeout_min <= 10: submitit counts any USR2 as a time-out (as SLURM's --signal before the limit)
        args = self.overrides("method=streamingllm", "budget=48", f"benchmark.limit={samples}",
                              "hydra.launcher.timeout_min=5")
        predictions = self.folder("streamingllm_48") / "predictions" / "passage_retrieval_zh.jsonl"
        proc = self.start(args)
        self.wait_for_lines(predictions, proc)
        running = [j.split()[0] for j in self.jobs() if j.endswith("RUNNING")]
        expect(len(running) == 1, f"expected one running job, queue: {self.jobs()}")
        self.cluster.run(["scancel", "--signal=USR2", running[0]])
        code, out = self.finish(proc, timeout=600)
        expect(code == 0, f"the sweep did not finish after the time-out signal (exit {code}):\n{tail(out)}")
        logs = "".join(p.read_text(errors="replace")
                       for p in (self.work / "multirun" / str(self.sweeps) / ".submitit").rglob("*_log.*"))
        expect("Requeued job" in logs, "submitit did not requeue the job (max_num_timeout?)")
        assert_complete(self.folder("streamingllm_48"), {"passage_retrieval_zh": samples})
        return f"job {running[0]} requeued after USR2 and resumed: {samples} unique samples"


# ----------------------------------------------------------------------------------------------- helpers


def tail(text: str, lines: int = 15) -> str:
    return "\n".join("    | " + line for line in text.strip().splitlines()[-lines:])


def snapshot(folders: list[Path]) -> dict[Path, bytes]:
    """Every file of the result folders but bookkeeping dot-files (the folder lock names its last holder)."""
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def assert_complete(folder: Path, expected: dict[str, int]) -> None:
    record = json.loads((folder / "run.json").read_text()) if (folder / "run.json").exists() else {}
    expect(record.get("status") == "complete", f"{folder}: run.json status {record.get('status')!r}")
    scores = json.loads((folder / "scores.json").read_text())
    for task, n in expected.items():
        lines = (folder / "predictions" / f"{task}.jsonl").read_text().splitlines()
        ids = [json.loads(line)["_id"] for line in lines]
        expect(len(ids) == n and len(set(ids)) == n,
               f"{folder.name}/{task}: {len(ids)} lines, {len(set(ids))} unique ids, expected {n}")
        expect(scores.get("n", {}).get(task) == n, f"{folder.name}: scores.json n={scores.get('n')}, expected {n}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma list of checks ({', '.join(CHECKS)})")
    parser.add_argument("--keep", action="store_true", help="keep the cluster and work folders for inspection")
    args = parser.parse_args(argv)
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(wanted) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    started = time.time()

    def say(text: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {text}", flush=True)

    data = find_longbench()
    if data is None:
        print("test-slurm: no LongBench files (passage_retrieval_zh.jsonl); set KVBENCH_LONGBENCH_DIR", file=sys.stderr)
        return 3
    try:
        install(log=say)
    except ClusterError as err:
        print(f"test-slurm: cannot install SLURM: {err}", file=sys.stderr)
        return 3
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        print("test-slurm: hydra-submitit-launcher is missing: pip install -e .[slurm]", file=sys.stderr)
        return 3
    outcomes: list[tuple[str, bool, str, float]] = []
    work = Path(tempfile.mkdtemp(prefix="kvbench-slurm-work-"))
    cluster = Cluster(keep=args.keep, log=say)
    try:
        try:
            cluster.start()
        except ClusterError as err:
            print(f"test-slurm: cannot start SLURM: {err}", file=sys.stderr)
            return 3
        say(f"SLURM up: {cluster.run(['sinfo', '-h', '-N', '-o', '%N %t %c CPUs %m MB']).stdout.strip()}; "
            f"work folder {work}")
        harness = Harness(cluster, data, work)
        for name in wanted:
            if name == "noacct":  # its own cluster, after this one stops
                continue
            t0 = time.time()
            try:
                detail = getattr(harness, f"check_{name}")()
                ok = True
            except Failed as err:
                detail, ok = str(err), False
            except ClusterError as err:
                detail, ok = f"SLURM command failed: {err}", False
            outcomes.append((name, ok, detail, time.time() - t0))
            say(f"{'PASS' if ok else 'FAIL'} {name} ({time.time() - t0:.0f} s): {detail}")
            for job in harness.jobs():  # a failed check must not leave jobs for the next one
                cluster.run(["scancel", job.split()[0]], check=False)
        if "noacct" in wanted:
            cluster.stop()
            cluster = Cluster(accounting=False, keep=args.keep, log=say)
            t0 = time.time()
            try:
                cluster.start()
                # its own folders: the new cluster numbers its jobs from 1 again (submitit's folders are per id)
                (work / "noacct").mkdir()
                detail, ok = Harness(cluster, data, work / "noacct").check_noacct(), True
            except (Failed, ClusterError) as err:
                detail, ok = str(err), False
            outcomes.append(("noacct", ok, detail, time.time() - t0))
            say(f"{'PASS' if ok else 'FAIL'} noacct ({time.time() - t0:.0f} s): {detail}")
    finally:
        cluster.stop()
        left = cluster.alive()
        if left:
            say(f"WARNING: still running: {left}")
        if not args.keep:
            import shutil
            shutil.rmtree(work, ignore_errors=True)
    failed = [o for o in outcomes if not o[1]]
    print(f"\ntest-slurm: {len(outcomes) - len(failed)} of {len(outcomes)} checks passed in "
          f"{time.time() - started:.0f} s")
    for name, ok, detail, took in outcomes:
        needs = f"  [depends on {NEEDS[name]}]" if name in NEEDS and not ok else ""
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<11} {took:5.0f} s  {detail.splitlines()[0][:150]}{needs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
