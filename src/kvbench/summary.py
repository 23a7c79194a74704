"""What a finished run prints: the scores and where the files are."""
from __future__ import annotations

from omegaconf import DictConfig

from kvbench.config import output_dir


def headline(scores: dict) -> float | None:
    """The run's one number: LongBench average (16-task when complete) or the needle's mean score."""
    if scores.get("benchmark") == "needle":
        return scores.get("mean_score")
    return scores.get("avg_en16") if scores.get("avg_en16") is not None else scores.get("avg")


def print_summary(cfg: DictConfig, scores: dict) -> float | None:
    print(f"\n{cfg.model.name} | {cfg.benchmark.name} | {cfg.method.name}"
          f"{'' if cfg.method.get('budget_agnostic') else f' budget={cfg.budget}'} | protocol={cfg.protocol.name}")
    for task, value in scores.get("tasks", {}).items():
        print(f"  {task:24s} {value:6.2f}  (n={scores['n'][task]})")
    value = headline(scores)
    if value is not None:
        label = "mean needle score" if scores.get("benchmark") == "needle" else "average"
        print(f"  {label:24s} {value:6.2f}" if label == "average" else f"  {label:24s} {value:6.3f}")
    print(f"  results: {output_dir(cfg)}")
    return value
