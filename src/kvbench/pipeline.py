"""`evaluate(cfg)`: from a composed config to predictions, scores and a run record. `run.py` is a thin wrapper.

Everything that can be checked before loading a model is checked first (method settings, task names, data
folder, protocol), so a typo fails in a second with a message, not after minutes of work.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

import kvbench
from kvbench.config import LONGBENCH_KINDS, output_dir, run_name, validate
from kvbench.engine import ContextCache, GenerationOutput, check_interval, check_session, generate, generate_requests
from kvbench.errors import KvbenchError
from kvbench.memory import PeakMemory
from kvbench.methods import Method, method_from_config
from kvbench.models import (ModelSpec, load_model, load_tokenizer, model_config, resolve_attention, resolve_dtype,
                            with_trained_len)
from kvbench.query import check_agnostic_model
from kvbench.requests import Request
from kvbench.results import RunStore
from kvbench.sample_rows import pop_and_write

log = logging.getLogger("kvbench")
VERSIONED_PACKAGES = ("torch", "transformers", "hydra-core", "datasets", "rouge", "rouge-score", "fuzzywuzzy",
                      "python-Levenshtein", "jieba", "gguf", "numpy", "flash-attn")


@dataclass
class Job:
    """What one run needs, resolved and validated before any model is loaded."""

    cfg: DictConfig
    spec: ModelSpec
    method: Method
    device: str
    out: Path
    benchmark: Any  # LongBenchPlan or NeedlePlan (see BENCHMARKS)

    @property
    def method_is_full(self) -> bool:
        return bool(self.cfg.method.get("budget_agnostic", False))


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KvbenchError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
    return name


def package_versions() -> dict[str, str | None]:
    versions = {"kvbench": kvbench.__version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}{'-dirty' if dirty else ''}" if sha else None


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


_LOADED: dict[str, tuple] = {}


def load_model_once(spec: ModelSpec, device: str):
    """Keep one model loaded across the jobs of a multirun (the basic launcher runs them in one process)."""
    key = json.dumps([spec.record(), device], sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()  # free the previous model before loading another
        _LOADED[key] = load_model(spec, device)
    return _LOADED[key]


# The benchmark kinds: name -> "module:planner". A planner takes (cfg, spec) and returns a plan with
# `protocol_name()`, `settings()` (the fingerprint part), `selection()` (what this command selects, for the record)
# and `run(store, model, tokenizer, run_one, show_progress, on_sample) -> scores` (scores of exactly the selection).
BENCHMARKS = {
    "longbench": "kvbench.longbench.runner:plan_longbench",
    "longbench_e": "kvbench.longbench.runner:plan_longbench",
    "needle": "kvbench.needle.runner:plan_needle",
    "ruler": "kvbench.ruler.runner:plan_ruler",
    "longgen": "kvbench.longgen.runner:plan_longgen",
}

SESSION_BENCHMARKS = ("needle", "ruler", "longbench")  # benchmark.session=true: the kinds that group questions on one context into turns


def plan_benchmark(cfg: DictConfig, spec: ModelSpec):
    name = cfg.benchmark.name
    if name not in BENCHMARKS:
        raise KvbenchError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    module, function = BENCHMARKS[name].split(":")
    return getattr(importlib.import_module(module), function)(cfg, spec)


def benchmark_hook(name: str, attribute: str):
    """An optional module-level function of a benchmark's planner module (e.g. `sweep_work`), or None."""
    module = BENCHMARKS[name].split(":")[0] if name in BENCHMARKS else None
    return getattr(importlib.import_module(module), attribute, None) if module else None


def prepare(cfg: DictConfig) -> Job:
    """Resolve and validate everything that does not need the model (types, method, data files, grid)."""
    validate(cfg)
    method = method_from_config(cfg.method, cfg.budget)
    limit = cfg.benchmark.get("max_new_tokens")
    if limit:
        check_interval(method, limit, "benchmark.max_new_tokens")
    if cfg.benchmark.get("session", False):  # refused before the model loads: answer mode, turn-boundary cuts
        if cfg.benchmark.name not in SESSION_BENCHMARKS:
            raise KvbenchError(f"benchmark.session=true: {cfg.benchmark.name} has no multi-turn sessions (samples "
                               f"sharing a context); sessions run on {', '.join(SESSION_BENCHMARKS)}")
        check_session(method, cfg.benchmark.get("session_answers", "gold"))
    spec = with_trained_len(ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True)))
    device = resolve_device(cfg.device)
    resolve_dtype(spec, device)
    plan = plan_benchmark(cfg, spec)
    if cfg.get("output_dir") and cfg.get("tag"):
        log.warning("tag=%s is not used: output_dir=%s names the folder (tag= only names default folders)",
                    cfg.tag, cfg.output_dir)
    return Job(cfg, spec, method, device, output_dir(cfg), plan)


def settings_of(job: Job) -> dict:
    """Every setting that changes predictions: the fingerprint of a result folder."""
    return {
        "model": job.spec.record(),
        "dtype": str(resolve_dtype(job.spec, job.device)),
        "attn_implementation": resolve_attention(job.spec, job.device),
        "method": job.method.params(),
        "benchmark": job.benchmark.settings(),
        "seed": job.cfg.seed,
    }


def user_command() -> str:
    """The command that reproduces this run: `python run.py <overrides>` as Hydra parsed them (in a multirun, this
    job's overrides, never the launcher's worker command line); outside Hydra, the process's command line."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return " ".join(shlex.quote(a) for a in sys.argv)
    return " ".join(["python", "run.py"] + [shlex.quote(o) for o in overrides])


def run_record(job: Job) -> dict:
    config = OmegaConf.to_container(job.cfg, resolve=True)
    if job.cfg.benchmark.name not in LONGBENCH_KINDS:
        config.pop("protocol", None)  # the LongBench prompt protocol does not affect other benchmarks
    return {
        "model": job.spec.record(),
        "method": job.method.params(),
        "benchmark": job.cfg.benchmark.name,
        "protocol": job.benchmark.protocol_name(),
        "run_name": run_name(job.cfg),
        "config": config,
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": device_description(job.device),
        "command": user_command(),
    }


class Timer:
    """Aggregates per-sample timings of one session for run.json."""

    def __init__(self) -> None:
        self.prefill, self.decode, self.new_tokens, self.samples = 0.0, 0.0, 0, 0
        self.start = time.perf_counter()
        self.model_load_s = 0.0  # loading the weights (and tokenizer), before `start`

    def add(self, out: GenerationOutput) -> None:
        self.samples += 1
        self.prefill += out.prefill_s
        self.decode += out.decode_s
        self.new_tokens += len(out.token_ids)

    def summary(self) -> dict:
        n = max(self.samples, 1)
        return {
            "total_s": round(time.perf_counter() - self.start, 2),
            "samples": self.samples,
            "prefill_s": round(self.prefill, 4),
            "decode_s": round(self.decode, 4),
            "new_tokens": self.new_tokens,
            "prefill_s_mean": round(self.prefill / n, 4),
            "decode_ms_per_token": round(1000 * self.decode / max(self.new_tokens, 1), 3),
            "s_per_sample": round((self.prefill + self.decode) / n, 3),
        }


class Generated:
    """A generation's output plus the per-sample fields the pipeline adds (the budget in tokens actually used)."""

    def __init__(self, out: GenerationOutput, extra: dict) -> None:
        self._out, self._extra = out, extra

    def __getattr__(self, name: str):
        return getattr(self._out, name)

    def log_fields(self) -> dict:
        return {**self._out.log_fields(), **self._extra}


class Interrupted(KvbenchError):
    """Ctrl-C: the run stopped cleanly; its record says "interrupted" and a rerun resumes it."""


def evaluate(cfg: DictConfig, on_sample: Callable[[str, dict], None] | None = None) -> dict:
    """Run the configured benchmark; returns the scores of what this command selected (also written to
    `<output_dir>/scores.json`)."""
    job = prepare(cfg)
    torch.manual_seed(cfg.seed)
    store = RunStore(job.out, settings_of(job), run_record(job))
    store.check()  # other settings' predictions, or a live run: refused before any model loads
    timer = Timer()
    try:
        tokenizer = load_tokenizer(job.spec)  # a missing tokenizer or hub model fails here, before the weights
        check = getattr(job.benchmark, "check_tokenizer", None)
        if check is not None:
            check(tokenizer)
        if cfg.benchmark.get("query", "aware") == "agnostic" or cfg.benchmark.get("session", False):
            # the context is compressed alone (sliding-window models are refused before the weights)
            check_agnostic_model(model_config(job.spec, tokenizer, job.device))
        loading = time.perf_counter()
        model, tokenizer = load_model_once(job.spec, job.device)
        timer.model_load_s = time.perf_counter() - loading  # ~0 when this process loaded it already (a multirun)
        if job.method.needs_model:  # a declared capability (Expected Attention, KVzip)
            job.method.bind(model, tokenizer)
        store.open()
        log.info("results: %s", job.out)
        try:
            scores = _run(job, store, model, tokenizer, timer, on_sample)
        except KeyboardInterrupt:
            if store.session is not None:
                store.end_session("interrupted", timing=timer.summary())
            raise
        except BaseException as err:
            if store.session is not None:
                try:
                    store.end_session("failed", timing=timer.summary(), error=f"{type(err).__name__}: {err}"[:500])
                except OSError:  # the disk is still full: the first error is the one to report, in one line
                    if isinstance(err, KvbenchError):
                        raise KvbenchError(f"{err} (run.json could not be marked failed either)") from None
            raise
        finally:
            store.close()
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {timer.samples} samples; rerun the same command to resume "
                          f"({job.out})") from None
    return scores


def _run(job: Job, store: RunStore, model, tokenizer, timer: Timer, on_sample) -> dict:
    timer.start = time.perf_counter()  # the session's time counts from here (model loading excluded)
    session = {"command": user_command(), "device": device_description(job.device), "host": socket.gethostname(),
               "model_load_s": round(timer.model_load_s, 2),
               "pid": os.getpid()}

    contexts = ContextCache()  # query-agnostic runs: samples sharing a context reuse its compressed cache

    def run_one(input_ids: list[int], max_new_tokens: int, stop_token_ids, min_new_tokens: int = 0,
                question_ids: list[int] | None = None, turns=None, answered=(), on_turn=None):
        """`question_ids` given: query-agnostic, `input_ids` is the context alone (compressed before the question).
        `turns` given: a multi-turn session over the context `input_ids` (benchmark.session_answers), its first
        turns replaying `answered`; `on_turn(i, turn_output, text)` sees each turn as it ends."""
        store.begin_session(session)  # the first sample of this session marks the record "running"
        if turns is not None:
            return run_session(input_ids, max_new_tokens, stop_token_ids, min_new_tokens, turns, answered, on_turn)
        ids = torch.tensor([input_ids], device=job.device)
        question = None if question_ids is None else torch.tensor([question_ids], device=job.device)
        out = generate(model, ids, job.method, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                       min_new_tokens=min_new_tokens, repetition_penalty=job.spec.repetition_penalty,
                       question_ids=question, contexts=contexts)
        timer.add(out)
        extra = {"budget_tokens": job.method.tokens_budget} if not job.method_is_full else {}
        return Generated(out, extra), tokenizer.decode(out.token_ids, skip_special_tokens=True)

    def run_session(input_ids, max_new_tokens, stop_token_ids, min_new_tokens, turns, answered, on_turn):
        request = Request(list(input_ids), max_new_tokens, tuple(stop_token_ids), min_new_tokens, turns=tuple(turns),
                          session_answers=job.cfg.benchmark.get("session_answers", "gold"), answered=tuple(answered))
        extra = {"budget_tokens": job.method.tokens_budget} if not job.method_is_full else {}

        def turn_done(_request, i, turn):
            on_turn(i, Generated(turn, extra), tokenizer.decode(turn.token_ids, skip_special_tokens=True))

        (_, out), = generate_requests(model, [request], job.method, repetition_penalty=job.spec.repetition_penalty,
                                      on_turn=turn_done if on_turn is not None else None)
        timer.add(out)
        return Generated(out, extra), tokenizer.decode(out.token_ids, skip_special_tokens=True)

    # Peak memory of this run's generation (model weights included), sampled every 20 ms.
    with PeakMemory(job.device, interval_s=0.02) as memory:
        scores = job.benchmark.run(store, model, tokenizer, run_one, job.cfg.progress, on_sample)
    all_records = [r for task in store.tasks_done() for r in store.records(task, _key_of(task))]
    kv_mean = int(sum(r.get("kv_bytes", 0) for r in all_records) / max(len(all_records), 1))
    pop_and_write(job.out, scores)  # per-sample scores -> sample_scores.jsonl (kept out of scores.json)
    store.write_scores(scores)
    selection = getattr(job.benchmark, "selection", None)
    store.end_session("complete", top={"kv_bytes_mean": kv_mean, "selection": selection() if selection else None},
                      timing={**timer.summary(), **(contexts.stats() if contexts.prefills else {})},
                      peak_memory_bytes=int(memory.peak))
    return scores


def _key_of(task: str) -> str:
    return "cell" if task == "needle" else "_id"
