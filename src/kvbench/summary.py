"""What a finished run prints: the scores of what the command selected, with their n, and where the files are."""
from __future__ import annotations

from omegaconf import DictConfig

from kvbench.config import LONGBENCH_KINDS, compression_ratio, output_dir


def headline(scores: dict) -> float | None:
    """The run's one number: LongBench average (16-task when complete) or the needle's mean score."""
    if scores.get("benchmark") == "needle":
        return scores.get("mean_score")
    return scores.get("avg_en16") if scores.get("avg_en16") is not None else scores.get("avg")


def print_summary(cfg: DictConfig, scores: dict) -> float | None:
    protocol = f" | protocol={cfg.protocol.name}" if cfg.benchmark.name in LONGBENCH_KINDS else ""
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
    value = headline(scores)
    if value is not None:
        if scores.get("benchmark") == "needle":
            print(f"  {'mean needle score':24s} {value:6.3f}  (n={scores.get('n')}; the papers' word overlap)")
            if scores.get("mean_retrieval") is not None:
                print(f"  {'needle retrieval':24s} {scores['mean_retrieval']:6.3f}  (share of cells naming the "
                      f"needle's key facts)")
        else:
            print(f"  {'average':24s} {value:6.2f}  (n={sum(scores.get('n', {}).values())})")
    also = scores.get("also_on_disk") or {}
    if also:
        listed = ", ".join(f"{task}: {count}" for task, count in sorted(also.items()))
        print(f"  also on disk, not in these scores: {listed} (samples outside this selection)")
    print(f"  results: {output_dir(cfg)}")
    return value
