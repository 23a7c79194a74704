"""`evaluate(cfg)`: from a composed config to predictions, scores and a run record. `run.py` is a thin wrapper.

Everything that can be checked before loading a model is checked first (method settings, task names, data
folder, protocol), so a typo fails in a second with a message, not after minutes of work.
"""
from __future__ import annotations

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
from typing import Callable, Iterable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

import kvbench
from kvbench.benchmark import Benchmark, grouped, of_config
from kvbench.config import output_dir, run_name, validate
from kvbench.engine import ContextCache, GenerationOutput, check_interval
from kvbench.multiturn import check_session
from kvbench.scheduler import AUTO, generate_requests
from kvbench.errors import KvbenchError
from kvbench.memory import PeakMemory
from kvbench.methods import Method, method_from_config
from kvbench.models import (ModelSpec, load_model, load_tokenizer, model_config, resolve_attention, resolve_dtype,
                            with_trained_len)
from kvbench.progress import progress
from kvbench.query import check_agnostic_model
from kvbench.requests import Request
from kvbench.results import RunStore
from kvbench.sample_rows import pop_and_write
from kvbench.sessions import resume_answers

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
    benchmark: Benchmark  # this command's plan

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


def prepare(cfg: DictConfig) -> Job:
    """Resolve and validate everything that does not need the model (types, method, data files, grid)."""
    validate(cfg)
    method = method_from_config(cfg.method, cfg.budget)
    limit = cfg.benchmark.get("max_new_tokens")
    if limit:
        check_interval(method, limit, "benchmark.max_new_tokens")
    spec = with_trained_len(ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True)))
    device = resolve_device(cfg.device)
    resolve_dtype(spec, device)
    benchmark = of_config(cfg.benchmark)
    if cfg.benchmark.get("session", False):  # refused before the model loads: answer mode, turn-boundary cuts
        if not benchmark.sessions:
            raise KvbenchError(f"benchmark.session=true: {cfg.benchmark.name} has no multi-turn sessions (samples "
                               f"sharing a context); drop benchmark.session")
        check_session(method, cfg.benchmark.get("session_answers", "gold"))
    plan = benchmark.plan(cfg, spec)
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
    if not job.benchmark.uses_protocol:
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
        job.benchmark.check_tokenizer(tokenizer)
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
    batching: dict = {}  # batch_size as applied (auto: the choice and its inputs), recorded in run.json

    def answer(requests: Iterable[Request], on_turn=None) -> Iterator[tuple[Request, Generated, str]]:
        """`on_turn(request, i, output, text)`: a session request's turn i as it ends."""
        def generated(out) -> Generated:  # the budget in tokens this sample's compressed prompt resolved to
            if job.method_is_full:
                return Generated(out, {})
            compressed = getattr(out, "context_tokens", None) or out.prompt_tokens  # agnostic, sessions: the context
            return Generated(out, job.method.budget_fields(compressed))  # with the clamp, where the minimum held more

        def started(requests):
            for request in requests:
                store.begin_session(session)  # the first sample of this session marks the record "running"
                yield request

        def turn_done(request, i, turn):
            on_turn(request, i, generated(turn), tokenizer.decode(turn.token_ids, skip_special_tokens=True))

        for request, out in generate_requests(model, started(requests), job.method, contexts=contexts,
                                              repetition_penalty=job.spec.repetition_penalty,
                                              batch_size=job.cfg.get("batch_size", 1), report=batching,
                                              prefill_pack_tokens=job.cfg.get("prefill_pack_tokens", AUTO),
                                              on_turn=turn_done if on_turn is not None else None):
            timer.add(out)
            yield request, generated(out), tokenizer.decode(out.token_ids, skip_special_tokens=True)

    # Peak memory of this run's generation (model weights included), sampled every 20 ms.
    with PeakMemory(job.device, interval_s=0.02) as memory:
        scores = predict(job.benchmark, store, model, tokenizer, answer, job.cfg.progress, on_sample,
                         job.spec.trained_len, job.cfg.model.name)
    key = job.benchmark.key
    all_records = [r for task in store.tasks_done() for r in store.records(task, key)]
    kv_mean = int(sum(r.get("kv_bytes", 0) for r in all_records) / max(len(all_records), 1))
    pop_and_write(job.out, scores)  # per-sample scores -> sample_scores.jsonl (kept out of scores.json)
    store.write_scores(scores)
    store.end_session("complete", top={"kv_bytes_mean": kv_mean, "selection": job.benchmark.selection()},
                      timing={**timer.summary(), **batching, **(contexts.stats() if contexts.prefills else {})},
                      peak_memory_bytes=int(memory.peak))
    return scores


def predict(bench: Benchmark, store: RunStore, model, tokenizer, answer, show_progress: bool = False,
            on_sample: Callable[[str, dict], None] | None = None, context: int | None = None,
            model_name: str = "the model") -> dict:
    """The sample loop: every selected sample not on disk yet (one with another digest on disk is refused) is
    prompted, answered by `answer(requests[, on_turn]) -> (request, output, text)` (in any order: the request's key
    finds its sample back), scored by the benchmark and written as it finishes; returns the scores of exactly the
    selection. A session (`Sample.turns`) is written turn by turn as each ends (`on_turn`); one cut short resumes at
    its first unanswered turn, the answers on disk replayed. `context`: the model's context length, which every
    session must fit as a whole (its later turns included)."""
    for task, samples in grouped(bench.select()).items():
        done = store.done(task, bench.key)  # repairs a torn last line (an interrupted write) before reading
        lines = on_disk(store, task, bench.key, samples) if done else {}
        for sample in samples:
            if sample.digest and any(r.get("sample_sha256") != sample.digest for r in lines.get(sample.key, ())):
                raise KvbenchError(f"{store.prediction_file(task)}: sample {sample.key} was predicted on other "
                                   f"data; delete {store.root} or choose another output_dir")
        todo = [s for s in samples if len(lines.get(s.key, ())) < max(s.turns, 1)]
        if not todo:
            continue
        answered = {s.key: resume_answers(lines.get(s.key, ()), s.turns) for s in todo if s.turns}

        def write(record: dict) -> None:
            store.append(task, record)
            if on_sample:
                on_sample(task, record)

        def on_turn(request, i, out, text) -> None:
            if i >= len(request.answered):  # a replayed turn is on disk already
                write(bench.record_turn(*request.key, i, out, text))

        requests = (Request(p.input_ids, p.max_new_tokens, tuple(p.stop_token_ids), p.min_new_tokens,
                            p.question_ids, key=(s, p), turns=p.turns, session_answers=p.session_answers,
                            answered=answered.get(s.key, ())) for s, p in bench.prompts(todo, tokenizer, model))
        if answered:  # sessions: every conversation fits the model's context, checked before the first is answered
            requests = sessions_fit(list(requests), context, model_name)
        label = f"{task} ({len(samples) - len(todo)} done)" if len(todo) < len(samples) else task
        answers = answer(requests, on_turn) if answered else answer(requests)  # on_turn: sessions only
        for request, out, text in progress(answers, len(todo), label, show_progress):
            if request.turns is None:  # a session's turns were written as they ended
                write(bench.record(*request.key, out, text))
    return bench.summarize(store)


def sessions_fit(requests: list[Request], context: int | None, model_name: str) -> list[Request]:
    """`requests`, refused in one line when a conversation can reach past the model's context (the first prompt
    fitting is not enough: each turn's question and answer stay in the cache)."""
    over = [r for r in requests if context is not None and r.positions() > context]
    if over:
        longest = max(over, key=Request.positions)
        raise KvbenchError(f"{len(over)} of {len(requests)} sessions can reach past {model_name}'s context of "
                           f"{context} tokens (the longest up to {longest.positions()}: context, every turn's question "
                           f"and answer, max_new_tokens); use shorter contexts, or model.trained_len=<tokens> if the "
                           f"model holds more")
    return requests


def on_disk(store: RunStore, task: str, key: str, samples: list) -> dict[str, list[dict]]:
    """A task's prediction lines by sample key: a session's lines (`session` = its key) in turn order."""
    lines: dict[str, list[dict]] = {}
    sessions = any(s.turns for s in samples)
    for record in store.records(task, key):
        if sessions and "turn" in record:
            lines.setdefault(str(record.get("session")), []).append(record)
        else:
            lines.setdefault(record.get(key), []).append(record)
    return lines
