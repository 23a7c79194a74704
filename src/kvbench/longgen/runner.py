"""Long-output runs: one prediction line per (length, sample) in `predictions/<task>.jsonl`, resumable.

Modelled on the RULER runner: the plan generates (or loads from the cache) every selected sample and checks it fits
the model before any model loads; selection (tasks, lengths, samples) is not a setting, so a larger selection
continues a run. Each line records the generated length (`new_tokens`) beside the reference's (`answer_tokens`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from kvbench.benchmark import register
from kvbench.config import STR, STR_LIST, optional
from kvbench.errors import KvbenchError
from kvbench.longgen.generate import FILLERS, TASKS, Generator, max_new_tokens
from kvbench.longgen.metrics import line_scores, task_score
from kvbench.ruler.data import set_sha256
from kvbench.ruler.runner import GeneratedBenchmark, QUERY_MODES, _int_list, check_lengths_fit, sample_id
from kvbench.ruler.template import TEMPLATES, ModelTemplate, model_template

log = logging.getLogger("kvbench")
MIN_OUTPUT_TOKENS = 256  # the benchmark's promise: every reference answer is at least this long


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 2) if values else None


@register
@dataclass
class LongGenPlan(GeneratedBenchmark):
    name = "longgen"
    schema = {"tasks": STR_LIST, "template": STR, "query": STR, "filler": STR,
              "haystack_dir": optional(STR), "cache_dir": optional(STR)}  # lengths, samples, output_tokens: plan
    tasks: list[str]
    lengths: list[int]
    samples: int
    output_tokens: int
    template: ModelTemplate
    query: str
    source: dict
    datasets: dict[tuple[str, int], list[dict]]
    generation_s: float = 0.0

    def protocol_name(self) -> str:
        return f"longgen_{self.template.name}" + ("_agnostic" if self.query == "agnostic" else "")

    def settings(self) -> dict:
        return {"name": "longgen", "template": self.template.name, "query": self.query,
                "output_tokens": self.output_tokens, "source": self.source}

    def selection(self) -> dict:
        return {"tasks": list(self.tasks), "lengths": list(self.lengths), "samples": self.samples}

    def data_sha256(self) -> dict[str, str]:
        return {f"{task}@{length}": set_sha256(samples) for (task, length), samples in self.datasets.items()}

    def score_fields(self, task: str, text: str, sample: dict) -> dict:
        return {**line_scores(text, sample["outputs"]), "answer_tokens": sample["answer_tokens"]}

    @classmethod
    def plan(cls, cfg, spec) -> "LongGenPlan":
        return plan_longgen(cfg, spec)

    @classmethod
    def sweep_work(cls, cfg) -> list[tuple[str, int, float, float]]:
        """Per task: samples, prompt tokens, tokens to generate (upper bound); a list of output_tokens takes at
        most max_new_tokens(output_tokens + one item of ~40 tokens) to write."""
        lengths = _int_list(cfg.benchmark.lengths, "benchmark.lengths")
        samples = int(cfg.benchmark.samples) * len(lengths)
        new_tokens = max_new_tokens(int(cfg.benchmark.output_tokens) + 40)
        return [(task, samples, float(sum(lengths) * int(cfg.benchmark.samples)), float(new_tokens * samples))
                for task in cfg.benchmark.tasks]

    def summarize(self, store) -> dict:
        """Scores of exactly this selection, with the mean generated and reference lengths."""
        by_length: dict[str, dict] = {}
        rows: list[dict] = []
        per_task: dict[str, list[float]] = {t: [] for t in self.tasks}
        generated: dict[str, list[int]] = {t: [] for t in self.tasks}
        for length in self.lengths:
            tasks, counts, details = {}, {}, {}
            for task in self.tasks:
                wanted = {sample_id(length, s["index"]) for s in self.datasets[(task, length)]}
                records = {r["_id"]: r for r in store.records(task) if r.get("_id") in wanted} \
                    if store.prediction_file(task).exists() else {}
                ordered = [records[sid] for sid in sorted(records, key=lambda s: int(s.split("_")[1]))]
                scores = [line_scores(r["pred"], r["outputs"]) for r in ordered]
                rows += [{"task": task, "id": r["_id"], "score": s["score"], "context_length": length,
                          "new_tokens": r.get("new_tokens"), "answer_tokens": r.get("answer_tokens")}
                         for r, s in zip(ordered, scores)]
                per_task[task] += [s["score"] for s in scores]
                generated[task] += [int(r.get("new_tokens", 0)) for r in ordered]
                tasks[task], counts[task] = task_score([s["score"] for s in scores]), len(scores)
                details[task] = {"new_tokens_mean": _mean([r.get("new_tokens", 0) for r in ordered]),
                                     "answer_tokens_mean": _mean([r["answer_tokens"] for r in ordered]),
                                     "exact": task_score([s["exact"] for s in scores]),
                                     "prefix": task_score([s["prefix"] for s in scores])}
            present = [tasks[t] for t in self.tasks if tasks[t] is not None]
            by_length[str(length)] = {"tasks": tasks, "n": counts, "details": details, "avg": _mean(present)}
        scores_by_task = {t: task_score(v) for t, v in per_task.items()}
        present = [v for v in scores_by_task.values() if v is not None]
        return {
            "benchmark": "longgen", "query": self.query, "template": self.template.name,
            "output_tokens": self.output_tokens,
            "lengths": by_length,
            "tasks": {t: v for t, v in scores_by_task.items() if v is not None},
            "n": {t: len(v) for t, v in per_task.items()},
            "new_tokens_mean": {t: _mean(v) for t, v in generated.items() if v},
            "avg": _mean(present),
            "sample_scores": rows,
            "data_sha256": self.data_sha256(),
            "generation_s": round(self.generation_s, 2),
        }


def _positive(bench, key: str, example: str) -> int:
    value = bench.get(key)
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or str(number) != str(value).strip() or number < 1:
        raise KvbenchError(f"benchmark.{key}={value!r}: give a positive integer, e.g. benchmark.{key}={example}")
    return number


def plan_longgen(cfg: DictConfig, spec) -> LongGenPlan:
    """Validate the selection, then build every sample (cached) and check it fits the model."""
    from kvbench.models import load_tokenizer

    bench = cfg.benchmark
    tasks = list(bench.tasks) if bench.get("tasks") is not None else list(TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise KvbenchError(f"benchmark.tasks: unknown long-output task(s) {', '.join(map(str, unknown)) or '(none)'}"
                           f"; choose from {', '.join(TASKS)}")
    lengths = _int_list(bench.lengths, "benchmark.lengths")
    samples = _positive(bench, "samples", "5")
    output_tokens = _positive(bench, "output_tokens", str(MIN_OUTPUT_TOKENS))
    if output_tokens < MIN_OUTPUT_TOKENS:
        raise KvbenchError(f"benchmark.output_tokens={output_tokens}: a long-output task writes at least "
                           f"{MIN_OUTPUT_TOKENS} tokens per sample. Fix: benchmark.output_tokens={MIN_OUTPUT_TOKENS}"
                           f" or more")
    query = str(bench.get("query") or "aware")
    if query not in QUERY_MODES:
        raise KvbenchError(f"benchmark.query={query!r}: choose one of {', '.join(QUERY_MODES)}")
    template_name = str(bench.get("template") or "auto")
    if template_name not in TEMPLATES:
        raise KvbenchError(f"benchmark.template={template_name!r}: choose one of {', '.join(TEMPLATES)}")
    filler = str(bench.get("filler") or "noise")
    if filler not in FILLERS:
        raise KvbenchError(f"benchmark.filler={filler!r}: choose one of {', '.join(FILLERS)}")
    limit = check_lengths_fit("longgen", cfg.model.name, spec.trained_len, lengths)

    tokenizer = load_tokenizer(spec)
    template = model_template(tokenizer, template_name)
    gen = Generator(tokenizer, template, int(cfg.seed), filler, bench.get("haystack_dir"))
    cache = bench.get("cache_dir") or str(Path(cfg.results_root) / ".cache" / "longgen")
    cache_dir = Path(cache) if str(cache) not in ("", "none", "None") else None
    start = time.perf_counter()
    datasets = {(task, length): gen.samples(task, length, output_tokens, samples, cache_dir)
                for task in tasks for length in lengths}
    generation_s = time.perf_counter() - start
    for (task, length), items in datasets.items():
        for sample in items:
            total = sample["prompt_tokens"] + sample["max_new_tokens"]
            if total > limit:
                raise KvbenchError(f"longgen {task} sample {sample['index']} at length {length} needs {total} tokens "
                                   f"(prompt + {sample['max_new_tokens']} to generate), more than {cfg.model.name}'s "
                                   f"{limit}. Fix: smaller benchmark.lengths or benchmark.output_tokens")
    log.info("long-output data ready in %.1f s (%d sets)", generation_s, len(datasets))
    return LongGenPlan(tasks, lengths, samples, output_tokens, template, query,
                       {"kind": "generated", **gen.identity()}, datasets, generation_s)


__all__ = ["LongGenPlan", "plan_longgen"]
