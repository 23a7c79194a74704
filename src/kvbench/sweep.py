"""Plan Hydra multirun sweeps: expand the grid, skip finished work, estimate the cost, print or run the commands.

    python -m kvbench.sweep plan --dry-run model=llama3_8b_instruct method=fullkv,snapkv budget=64,128
    python -m kvbench.sweep plan  ...      # the `python run.py -m ...` commands for the remaining jobs only
    python -m kvbench.sweep run   ...      # run those commands, one after another

The grid is the Cartesian product of comma-separated override values, as Hydra's basic sweeper builds it (the
values are parsed by Hydra's own override parser, so `range(64,257,64)` and quoted values work too). Each job's
config is the one `python run.py <overrides>` would see, so its result folder is exactly the folder the run
writes. Jobs that land in the same folder (FullKV at every budget: `budget_agnostic`) collapse into one.

Cost model (deliberately simple; calibrate it with the two options from a run.json `timing` of your own):
    seconds per sample = prompt_tokens / 1000 * seconds_per_ktoken + max_new_tokens * seconds_per_token
- prompt_tokens: LongBench: the task file's mean bytes per sample (from the bundled manifest) / 4 bytes per
  token, capped at `model.max_input_len` when set (prompts are truncated to it); needle: the cell's context length.
- max_new_tokens: the task's generation limit (an upper bound: many answers stop early at EOS).
- defaults: 0.15 s per 1k prompt tokens and 0.03 s per generated token, a 7-8B model in bf16 with batch size 1
  on one A100/H100-class GPU in this harness (HF generate loop). Tiny CPU models are far cheaper than this.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from kvbench.config import CONFIG_DIR, compose, output_dir, run_name, sweepable_method_settings
from kvbench.errors import KvbenchError
from kvbench.results import RUN_FILE, folder_locked
from kvbench.slurm import WAITING, queued_jobs

RUN_PY = CONFIG_DIR.parent / "run.py"
STATUSES = ("done", "partial", "todo", "running", "pending", "conflict")


class SweepError(KvbenchError):
    """A sweep specification or a result folder that the planner cannot handle."""


@dataclass(frozen=True)
class CostModel:
    """Seconds per sample = prompt tokens / 1000 * seconds_per_ktoken + new tokens * seconds_per_token."""

    seconds_per_ktoken: float = 0.15
    seconds_per_token: float = 0.03

    def __post_init__(self) -> None:
        if self.seconds_per_ktoken < 0 or self.seconds_per_token < 0:
            raise SweepError("--seconds-per-ktoken and --seconds-per-token must be >= 0")

    def seconds(self, prompt_tokens: float, new_tokens: float) -> float:
        return prompt_tokens / 1000.0 * self.seconds_per_ktoken + new_tokens * self.seconds_per_token


@dataclass(frozen=True)
class Axis:
    """One swept override: `key` as written (with any +/~ prefix) and its values, as text and typed."""

    key: str
    values: tuple[str, ...]
    typed: tuple[Any, ...]


@dataclass
class Sweep:
    """The parsed command line: overrides every job shares, then the swept axes (in the order given)."""

    fixed: list[str]
    axes: list[Axis]


@dataclass
class Work:
    """Samples of one unit of a job (a LongBench task, or the needle grid) and their token counts."""

    name: str
    samples: int
    prompt_tokens: float   # summed over the samples
    new_tokens: float      # summed over the samples (upper bound)

    def scaled(self, samples_left: int) -> "Work":
        share = samples_left / self.samples if self.samples else 0.0
        return Work(self.name, samples_left, self.prompt_tokens * share, self.new_tokens * share)


@dataclass
class PlannedJob:
    """One distinct run of the sweep: its choices on the swept axes, where it writes, and what is left of it."""

    choice: dict[str, str]
    cfg: DictConfig
    out: Path
    status: str = "todo"
    samples_total: int = 0
    samples_left: int = 0
    seconds_left: float = 0.0
    note: str = ""
    shard: int | None = field(default=None)

    @property
    def label(self) -> str:
        return f"{self.cfg.model.name}/{self.cfg.benchmark.name}/{run_name(self.cfg)}"

    @property
    def remaining(self) -> bool:
        return self.status in ("todo", "partial")


# ----------------------------------------------------------------------------------------------- parsing


def parse_sweep(overrides: Sequence[str]) -> Sweep:
    """Split overrides into shared ones and swept axes with Hydra's parser (so the grammar is Hydra's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise SweepError(f"cannot parse the overrides: {err}") from err
    fixed, axes, seen = [], [], set()
    for override in parsed:
        key = override.get_key_element()
        if key in seen:
            raise SweepError(f"{key} is given twice; give it once (a sweep lists its values: {key}=a,b)")
        seen.add(key)
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        if "glob(" in override.input_line:
            raise SweepError(f"{override.input_line}: glob() sweeps are not supported here; list the values")
        # The string form keeps any quotes, as Hydra's basic sweeper passes it on to each job.
        values = tuple(override.sweep_string_iterator())
        axes.append(Axis(key, values, tuple(override.sweep_iterator())))
    return Sweep(fixed, axes)


def expand(sweep: Sweep) -> list[dict[str, str]]:
    """The Cartesian product of the axes, first axis slowest (Hydra's order): a list of {key: value text}."""
    keys = [axis.key for axis in sweep.axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axis.values for axis in sweep.axes))]


# ----------------------------------------------------------------------------------------------- composing


class _Composer:
    """Composes job configs, calling Hydra once per distinct set of structural choices.

    Hydra's compose costs ~0.1-0.2 s, and a paper grid has ~150 jobs. An axis that only sets a value already in
    the config (budget, tag, benchmark.limit) is applied to a copy with OmegaConf.update, which is what Hydra
    does for such overrides; axes that pick config groups (model, method) or add/delete keys go through Hydra.
    """

    def __init__(self, sweep: Sweep, config_dir: Path) -> None:
        self.sweep = sweep
        self.config_dir = config_dir
        self._base: dict[tuple[str, ...], DictConfig] = {}

    def _is_structural(self, key: str) -> bool:
        bare = key.lstrip("+~")
        return bare != key or "/" in bare or bare.startswith("hydra") or (self.config_dir / bare).is_dir()

    def compose_job(self, choice: dict[str, str]) -> DictConfig:
        structural = tuple(f"{k}={v}" for k, v in choice.items() if self._is_structural(k))
        if structural not in self._base:
            self._base[structural] = _compose_or_explain(self.sweep.fixed + list(structural), self.config_dir)
        cfg = self._base[structural].copy()
        for axis in self.sweep.axes:
            if self._is_structural(axis.key):
                continue
            value = axis.typed[axis.values.index(choice[axis.key])]
            if OmegaConf.select(cfg, axis.key, default=_MISSING) is _MISSING:
                # Not in the config: let Hydra compose it and report the error its own way.
                return _compose_or_explain(self.sweep.fixed + [f"{k}={v}" for k, v in choice.items()],
                                           self.config_dir)
            OmegaConf.update(cfg, axis.key, value, merge=True)
        return cfg


_MISSING = object()


def _compose_or_explain(overrides: list[str], config_dir: Path) -> DictConfig:
    """kvbench.config.compose, with Hydra's composition errors turned into a one-line SweepError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(overrides, config_dir)
    except (HydraException, OmegaConfBaseException) as err:
        raise SweepError(f"the config does not compose with {' '.join(overrides)}: {err}") from err


# ----------------------------------------------------------------------------------------------- work and cost


def job_work(cfg: DictConfig) -> list[Work]:
    """What a job has to run, per unit of its benchmark (LongBench: per task; needle: the grid), with token
    counts for the cost model."""
    from kvbench.benchmark import of_config

    return [Work(*unit) for unit in of_config(cfg.benchmark).sweep_work(cfg)]


def samples_done(out: Path, unit: str, cfg: DictConfig) -> int:
    """Samples of this job's selection already in a result folder, for one unit (LongBench: lines of the task's
    file, the store selects the first `limit` samples in file order, so a folder holds a prefix; needle: the
    cells of this grid found in the folder)."""
    from kvbench.benchmark import of_config

    return of_config(cfg.benchmark).samples_done(out, unit, cfg)


def classify(out: Path, cfg: DictConfig) -> tuple[str, str]:
    """(status, note) before counting samples: todo (no folder), running (a live run holds the folder's lock:
    never submitted again), conflict (unreadable run.json), or "exists" (the samples left decide done/partial)."""
    if not out.exists():
        return "todo", ""
    holder = folder_locked(out)
    if holder:
        return "running", f"a live run holds it: {holder}"
    run_file = out / RUN_FILE
    if not run_file.exists():
        return "exists", ""
    try:
        record = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "conflict", f"{run_file} is corrupt; delete {out} to redo it"
    held, asked = (record.get("config") or {}).get("method"), OmegaConf.to_container(cfg.method, resolve=True)
    if isinstance(held, dict) and held != asked:  # run.py would refuse the folder (other settings)
        changed = sorted(k for k in set(held) | set(asked) if held.get(k) != asked.get(k))
        return "conflict", (f"{out} holds results of other method settings ({', '.join(changed)}); name this "
                            f"variant with tag=... or output_dir=...")
    return "exists", "" if record.get("status") == "complete" else f"last run {record.get('status', 'unknown')}"


def _fill_costs(job: PlannedJob, cost: CostModel) -> None:
    """Samples total/left and the cost of what is left. A folder that holds every selected sample of a complete
    run is done, whatever larger selection it also holds (the run would score this selection and generate
    nothing); one that lacks some is partial (the run adds them), as the result store does."""
    work = job_work(job.cfg)
    job.samples_total = sum(w.samples for w in work)
    if job.status in ("running", "pending", "conflict"):
        return
    left = [w.scaled(max(w.samples - samples_done(job.out, w.name, job.cfg), 0)) for w in work]
    job.samples_left = sum(w.samples for w in left)
    job.seconds_left = sum(cost.seconds(w.prompt_tokens, w.new_tokens) for w in left)
    if job.status == "exists":
        job.status = "done" if job.samples_left == 0 and not job.note else "partial"
        if job.status == "done":
            job.note = ""


# ----------------------------------------------------------------------------------------------- planning


def plan(overrides: Sequence[str], cost: CostModel | None = None,
         config_dir: str | Path = CONFIG_DIR) -> tuple[Sweep, list[PlannedJob]]:
    """Expand the sweep, compose each job, drop jobs writing to a folder already planned, classify and cost."""
    sweep = parse_sweep(sweepable_method_settings(list(overrides)))
    keys = {o.split("=", 1)[0].lstrip("+~") for o in sweep.fixed} | {a.key.lstrip("+~") for a in sweep.axes}
    if {"budget", "method.compression_ratio"} <= keys:  # each job would be refused (kvbench.config)
        raise SweepError("budget= and method.compression_ratio= both set the KV size; sweep one of them (a ratio "
                         "run is named after its ratio)")
    composer = _Composer(sweep, Path(config_dir))
    cost = cost or CostModel()
    jobs: dict[Path, PlannedJob] = {}
    slurm_queue: dict[str, dict] = {}
    for choice in expand(sweep):
        cfg = composer.compose_job(choice)
        out = output_dir(cfg)
        if out in jobs:
            _check_same_run(jobs[out], choice, cfg)  # FullKV at another budget is the same run: skip it
            continue
        job = PlannedJob(choice, cfg, out)
        job.status, job.note = classify(out, cfg)
        if job.status in ("todo", "exists"):  # a SLURM job squeue lists will write it (kvbench.slurm)
            queued = slurm_queue.setdefault(str(cfg.results_root), queued_jobs(cfg.results_root))
            if os.path.abspath(out) in queued:
                slurm_id, state = queued[os.path.abspath(out)]
                job.status = "pending" if state in WAITING else "running"
                job.note = f"SLURM job {slurm_id} is {state.lower()}"
        _fill_costs(job, cost)
        jobs[out] = job
    return sweep, list(jobs.values())


def _check_same_run(first: PlannedJob, choice: dict[str, str], cfg: DictConfig) -> None:
    """Two jobs may share a folder only when they differ in nothing but the budget (or compression ratio) of a
    budget-agnostic method; otherwise the second would be refused by the result store (or mixed into the first),
    so fail now."""
    def without_budget(c: DictConfig) -> dict:
        plain = {k: v for k, v in OmegaConf.to_container(c, resolve=False).items() if k != "budget"}
        plain["method"] = {k: v for k, v in plain["method"].items() if k != "compression_ratio"}
        return plain

    if not (cfg.method.get("budget_agnostic", False) and without_budget(first.cfg) == without_budget(cfg)):
        raise SweepError(
            f"the jobs {_describe(first.choice)} and {_describe(choice)} both write to {first.out}; "
            f"give the variants different tags (tag=...) or separate results_root, or sweep them one at a time")


def _describe(choice: dict[str, str]) -> str:
    return "[" + " ".join(f"{k}={v}" for k, v in choice.items()) + "]"


def assign_shards(jobs: list[PlannedJob], shards: int) -> None:
    """Spread the remaining jobs over `shards` workers, longest first to the least loaded (balanced by cost)."""
    if shards < 1:
        raise SweepError(f"--shards must be at least 1, got {shards}")
    load = [0.0] * shards
    ordered = sorted((j for j in jobs if j.remaining), key=lambda j: (-j.seconds_left, j.label))
    for job in ordered:
        target = min(range(shards), key=lambda i: (load[i], i))
        job.shard = target
        load[target] += job.seconds_left


def commands(sweep: Sweep, jobs: Iterable[PlannedJob]) -> list[list[str]]:
    """`run.py -m` argument lists covering exactly the given jobs: as few Cartesian products as found."""
    keys = [axis.key for axis in sweep.axes]
    rows = [tuple(job.choice[k] for k in keys) for job in jobs]
    if not rows:
        return []
    best = None
    orders = itertools.permutations(range(len(keys))) if len(keys) <= 6 else [tuple(range(len(keys)))]
    for order in orders:
        blocks = _factor([tuple(r[i] for i in order) for r in rows])
        if best is None or len(blocks) < len(best[1]):
            best = (order, blocks)
    order, blocks = best
    return [_command_args(sweep, [keys[i] for i in order], block) for block in blocks]


def _factor(rows: list[tuple[str, ...]]) -> list[list[list[str]]]:
    """Split a set of value tuples into products: each block lists, per position, the values it takes."""
    if not rows or not rows[0]:
        return [[]] if rows else []
    firsts_by_rest: dict[tuple[str, ...], list[str]] = {}
    for row in dict.fromkeys(rows):
        firsts_by_rest.setdefault(row[1:], []).append(row[0])
    rests_by_firsts: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for rest, firsts in firsts_by_rest.items():
        rests_by_firsts.setdefault(tuple(firsts), []).append(rest)
    return [[list(firsts)] + block for firsts, rests in rests_by_firsts.items() for block in _factor(rests)]


def _command_args(sweep: Sweep, keys: list[str], block: list[list[str]]) -> list[str]:
    values = dict(zip(keys, block))
    return ["-m"] + sweep.fixed + [f"{axis.key}={','.join(values[axis.key])}" for axis in sweep.axes]


def shell_command(args: list[str]) -> str:
    """The command line a user can paste: `python run.py -m ...`, quoted for the shell."""
    run_py = os.path.relpath(RUN_PY) if Path.cwd() in RUN_PY.parents else str(RUN_PY)
    return " ".join(["python", shlex.quote(run_py)] + [shlex.quote(a) for a in args])


# ----------------------------------------------------------------------------------------------- output


def format_table(jobs: list[PlannedJob], show_shards: bool = False) -> str:
    """One line per job: status, samples left/total, estimated GPU hours left, the run and any note."""
    head = f"{'#':>4}  {'status':<8} {'samples':>11} {'est_h':>8}  " + ("gpu  " if show_shards else "") + "run"
    lines = [head]
    for number, job in enumerate(jobs):
        samples = f"{job.samples_left}/{job.samples_total}"
        shard = f"{'-' if job.shard is None else job.shard:<3}  " if show_shards else ""
        note = f"  ({job.note})" if job.note else ""
        lines.append(f"{number:>4}  {job.status:<8} {samples:>11} {job.seconds_left / 3600:>8.2f}  "
                     f"{shard}{job.label}{note}")
    return "\n".join(lines)


def format_totals(jobs: list[PlannedJob], cost: CostModel, shards: int = 1) -> str:
    count = {status: sum(j.status == status for j in jobs) for status in STATUSES}
    hours = sum(j.seconds_left for j in jobs) / 3600
    text = (f"jobs: {len(jobs)}  done: {count['done']}  to do: {count['todo'] + count['partial']} "
            f"(partial: {count['partial']})  running elsewhere: {count['running']}  pending in SLURM: "
            f"{count['pending']}  conflicts: {count['conflict']}  "
            f"samples left: {sum(j.samples_left for j in jobs)}  est. GPU hours: {hours:.2f}\n"
            f"cost model: {cost.seconds_per_ktoken:g} s per 1k prompt tokens + {cost.seconds_per_token:g} s per "
            f"new token (upper bound; --seconds-per-ktoken / --seconds-per-token)")
    if shards > 1:
        per = [sum(j.seconds_left for j in jobs if j.shard == i) / 3600 for i in range(shards)]
        text += "\nper GPU (h): " + ", ".join(f"{i}: {h:.2f}" for i, h in enumerate(per))
        text += f"  wall-clock ~{max(per):.2f} h"
    return text


# ----------------------------------------------------------------------------------------------- CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.sweep",
        description="Plan or run a Hydra multirun sweep, skipping finished jobs (see the module docstring).")
    parser.add_argument("mode", choices=("plan", "run"), help="plan: print; run: execute the remaining jobs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; comma lists are swept (method=a,b)")
    parser.add_argument("--dry-run", action="store_true", help="print the job table and cost; run nothing")
    parser.add_argument("--default", action="append", default=[], metavar="KEY=VALUE",
                        help="an override used unless the overrides set the same key (for wrapper scripts)")
    parser.add_argument("--seconds-per-ktoken", type=float, default=CostModel.seconds_per_ktoken,
                        help="prefill seconds per 1000 prompt tokens (default %(default)s)")
    parser.add_argument("--seconds-per-token", type=float, default=CostModel.seconds_per_token,
                        help="decode seconds per generated token (default %(default)s)")
    parser.add_argument("--shards", type=int, default=1, help="split the remaining jobs over N workers (GPUs)")
    parser.add_argument("--shard-index", type=int, default=None, help="keep only this worker's jobs (0..N-1)")
    args = parser.parse_intermixed_args(argv)
    if args.shard_index is not None and not 0 <= args.shard_index < args.shards:
        parser.error(f"--shard-index must be in 0..{args.shards - 1}")
    return args


def with_defaults(overrides: list[str], defaults: list[str]) -> list[str]:
    """Defaults first, minus those whose key the overrides set (`method=...` replaces a default method list)."""
    def key(text: str) -> str:
        if "=" not in text:
            raise SweepError(f"--default {text!r}: expected KEY=VALUE")
        return text.split("=", 1)[0].lstrip("+~")

    given = {key(o) for o in overrides if "=" in o}
    return [d for d in defaults if key(d) not in given] + overrides


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kvbench.sweep plan|run [--dry-run] [options] overrides...`; returns the exit status."""
    try:
        return _main(_parse_args(argv))
    except KvbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader has seen enough
        sys.stderr.close()
        return 0


def _main(args: argparse.Namespace) -> int:
    cost = CostModel(args.seconds_per_ktoken, args.seconds_per_token)
    sweep, jobs = plan(with_defaults(args.overrides, args.default), cost)
    assign_shards(jobs, args.shards)
    if args.shard_index is not None:
        jobs = [j for j in jobs if j.shard == args.shard_index]
    todo = [j for j in jobs if j.remaining]
    cmds = commands(sweep, todo)
    if args.dry_run:
        print(format_table(jobs, show_shards=args.shards > 1))
        print(format_totals(jobs, cost, args.shards if args.shard_index is None else 1))
        print("\n".join(["would run:"] + [shell_command(c) for c in cmds]) if cmds else "nothing to run")
        return 0
    for job in jobs:
        if job.status in ("conflict", "running", "pending"):
            print(f"skipped ({job.status}): {job.label}: {job.note}", file=sys.stderr)
    if args.mode == "plan":
        print(f"# {len(todo)} of {len(jobs)} jobs to run, est. {sum(j.seconds_left for j in todo) / 3600:.2f} "
              f"GPU hours", file=sys.stderr)
        print("\n".join(shell_command(c) for c in cmds))
        return 0
    return _run_commands(cmds)


def _run_commands(cmds: list[list[str]]) -> int:
    """Run each `run.py -m` command in turn; stop at the first failure and return its exit status."""
    if not cmds:
        print("nothing to run: every job of the sweep is done", file=sys.stderr)
        return 0
    for number, cmd in enumerate(cmds, start=1):
        print(f"[sweep {number}/{len(cmds)}] {shell_command(cmd)}", file=sys.stderr, flush=True)
        code = subprocess.run([sys.executable, str(RUN_PY)] + cmd).returncode
        if code != 0:
            print(f"[sweep] command {number} failed with exit status {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
