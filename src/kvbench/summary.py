"""What a finished run prints: the scores of what the command selected, with their n, and where the files are."""
from __future__ import annotations

from omegaconf import DictConfig

from kvbench.benchmark import of_config
from kvbench.config import compression_ratio, output_dir


def print_summary(cfg: DictConfig, scores: dict) -> float | None:
    benchmark = of_config(cfg.benchmark)
    protocol = f" | protocol={cfg.protocol.name}" if benchmark.uses_protocol else ""
    ratio = compression_ratio(cfg)
    size = "" if cfg.method.get("budget_agnostic") else \
        f" compression_ratio={ratio:g}" if ratio is not None else f" budget={cfg.budget}"
    query = cfg.benchmark.get("query", "aware")
    variant = (" | multi-needle" if cfg.benchmark.get("multi_needle") else "") + \
        (f" | query={query}" if query != "aware" else "")
    print(f"\n{cfg.model.name} | {cfg.benchmark.name} | {cfg.method.name}{size}{protocol}{variant}")
    generated = scores.get("new_tokens_mean") or {}  # long-output benchmarks report the mean generated length
    for task, value in scores.get("tasks", {}).items():
        length = f", {generated[task]:.1f} tokens generated on average" if generated.get(task) is not None else ""
        print(f"  {task:24s} {value:6.2f}  (n={scores['n'][task]}{length})")
    for line in benchmark.summary_lines(scores):
        print(line)
    also = scores.get("also_on_disk") or {}
    if also:
        listed = ", ".join(f"{task}: {count}" for task, count in sorted(also.items()))
        print(f"  also on disk, not in these scores: {listed} (samples outside this selection)")
    print(f"  results: {output_dir(cfg)}")
    return benchmark.headline(scores)
