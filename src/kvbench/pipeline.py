"""`evaluate(cfg)`: from a composed config to predictions, scores and a run record. `run.py` is a thin wrapper.

Everything that can be checked before loading a model is checked first (method settings, task names, data
folder, protocol), so a typo fails in a second with a message, not after minutes of work.
"""
from __future__ import annotations

import json
import logging
import platform
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
from kvbench.config import output_dir, run_name
from kvbench.engine import GenerationOutput, generate
from kvbench.errors import KvbenchError
from kvbench.memory import PeakMemory
from kvbench.methods import Method, method_from_config
from kvbench.models import ModelSpec, load_model, resolve_attention, resolve_dtype
from kvbench.results import RunStore

log = logging.getLogger("kvbench")
BENCHMARKS = ("longbench", "longbench_e", "needle")
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
    benchmark: Any  # LongBenchPlan or NeedlePlan


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
    """Resolve and validate everything that does not need the model."""
    name = cfg.benchmark.name
    if name not in BENCHMARKS:
        raise KvbenchError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    method = method_from_config(cfg.method, cfg.budget)
    spec = ModelSpec.from_config(OmegaConf.to_container(cfg.model, resolve=True))
    device = resolve_device(cfg.device)
    if name == "needle":
        from kvbench.needle.runner import plan_needle
        plan = plan_needle(cfg)
    else:
        from kvbench.longbench.runner import plan_longbench
        plan = plan_longbench(cfg, spec)
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


def run_record(job: Job) -> dict:
    return {
        "model": job.spec.record(),
        "method": job.method.params(),
        "benchmark": job.cfg.benchmark.name,
        "protocol": job.benchmark.protocol_name(),
        "run_name": run_name(job.cfg),
        "config": OmegaConf.to_container(job.cfg, resolve=True),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": device_description(job.device),
        "command": " ".join(sys.argv),
    }


class Timer:
    """Aggregates per-sample timings and KV bytes for run.json."""

    def __init__(self) -> None:
        self.prefill, self.decode, self.new_tokens, self.kv_bytes, self.samples = 0.0, 0.0, 0, 0, 0
        self.start = time.perf_counter()

    def add(self, out: GenerationOutput) -> None:
        self.samples += 1
        self.prefill += out.prefill_s
        self.decode += out.decode_s
        self.new_tokens += len(out.token_ids)
        self.kv_bytes += out.kv_bytes

    def summary(self) -> dict:
        n = max(self.samples, 1)
        return {
            "total_s": round(time.perf_counter() - self.start, 2),
            "samples_this_session": self.samples,
            "prefill_s_mean": round(self.prefill / n, 4),
            "decode_ms_per_token": round(1000 * self.decode / max(self.new_tokens, 1), 3),
            "s_per_sample": round((self.prefill + self.decode) / n, 3),
            "kv_bytes_mean_this_session": int(self.kv_bytes / n),
        }


def evaluate(cfg: DictConfig, on_sample: Callable[[str, dict], None] | None = None) -> dict:
    """Run the configured benchmark; returns the scores (also written to `<output_dir>/scores.json`)."""
    job = prepare(cfg)
    torch.manual_seed(cfg.seed)
    store = RunStore(job.out, settings_of(job), run_record(job))
    store.open()
    log.info("results: %s", job.out)
    model, tokenizer = load_model_once(job.spec, job.device)
    job.method.bind(model, tokenizer)  # methods that need the model (Expected Attention, KVzip)
    timer = Timer()

    def run_one(input_ids: list[int], max_new_tokens: int, stop_token_ids, min_new_tokens: int = 0):
        ids = torch.tensor([input_ids], device=job.device)
        out = generate(model, ids, job.method, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                       min_new_tokens=min_new_tokens, repetition_penalty=job.spec.repetition_penalty)
        timer.add(out)
        return out, tokenizer.decode(out.token_ids, skip_special_tokens=True)

    # Peak memory of this run's generation (model weights included), sampled every 20 ms.
    with PeakMemory(job.device, interval_s=0.02) as memory:
        scores = job.benchmark.run(store, model, tokenizer, run_one, cfg.progress, on_sample)
    timing = timer.summary()
    all_records = [r for task in store.tasks_done() for r in store.records(task)]
    kv_mean = int(sum(r.get("kv_bytes", 0) for r in all_records) / max(len(all_records), 1))
    store.finish(scores, timing=timing, peak_memory_bytes=int(memory.peak), kv_bytes_mean=kv_mean)
    return scores
