"""Paired comparison of two runs on the same samples: `python -m kvbench.compare RUN_A RUN_B [--out FILE]`.

For each task and for the task average: the mean difference A - B (score points, 0-100), its paired bootstrap
percentile CI, and a two-sided paired sign-flip permutation p-value (see `kvbench.stats`). Reads each run's
`sample_scores.jsonl`; runs whose tasks or sample ids differ are refused (a paired test needs the same samples).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from kvbench.atomic import write_json_atomic
from kvbench.errors import KvbenchError
from kvbench.sample_rows import read_sample_scores
from kvbench.stats import CONFIDENCE, N_PERMUTATIONS, N_RESAMPLES, SEED, paired_comparison

__all__ = ["pair_samples", "compare_samples", "compare_runs", "main"]
KEYS = ("mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "p_value", "n")


def pair_samples(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] = ("A", "B"),
                 tasks: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """{task: frame with columns a, b indexed by sample id} for two per-sample score frames (task, id, score).

    `tasks` restricts the pairing (default: every task, which must then be the same in both runs). A task whose
    ids differ is a KvbenchError naming the task and an example id.
    """
    tasks_a, tasks_b = set(a["task"]), set(b["task"])
    wanted = sorted(tasks_a | tasks_b) if tasks is None else list(tasks)
    missing = [(t, names[0] if t not in tasks_a else names[1]) for t in wanted if t not in tasks_a & tasks_b]
    if missing:
        task, run = missing[0]
        raise KvbenchError(f"cannot pair {names[0]} with {names[1]}: task {task!r} has no per-sample scores in "
                           f"{run}; compare runs of the same tasks")
    paired = {}
    for task in wanted:
        left = a[a["task"] == task].set_index("id")["score"]
        right = b[b["task"] == task].set_index("id")["score"]
        only_a, only_b = left.index.difference(right.index), right.index.difference(left.index)
        if len(only_a) or len(only_b):
            example = (only_a if len(only_a) else only_b)[0]
            raise KvbenchError(
                f"cannot pair {names[0]} with {names[1]}: task {task!r} has {len(only_a)} sample id(s) only in "
                f"{names[0]} and {len(only_b)} only in {names[1]} (e.g. {example!r}); compare runs made on the "
                f"same samples (same data, limit and grid)")
        paired[task] = pd.DataFrame({"a": left, "b": right.reindex(left.index)})
    return paired


def compare_samples(a: pd.DataFrame, b: pd.DataFrame, names: tuple[str, str] = ("A", "B"),
                    tasks: list[str] | None = None, confidence: float = CONFIDENCE,
                    n_resamples: int = N_RESAMPLES, n_permutations: int = N_PERMUTATIONS, seed: int = SEED) -> dict:
    """Paired comparison of two per-sample score frames (scores 0..1); results in score points (x 100).

    Returns {"tasks": {task: {mean_a, mean_b, mean_diff, ci_low, ci_high, p_value, n}}, "average": {same keys}},
    where mean_diff = mean_a - mean_b and "average" is over the tasks' means (the table's Avg.).
    """
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise KvbenchError(f"confidence={confidence}: give a level between 0 and 1, e.g. 0.95")
    paired = pair_samples(a, b, names, tasks)
    order = list(paired)
    result = paired_comparison([paired[t]["a"].to_numpy() for t in order], [paired[t]["b"].to_numpy() for t in order],
                               confidence, n_resamples, n_permutations, seed)

    def scaled(entry: dict, mean_a: float, mean_b: float) -> dict:
        out = {"mean_a": 100 * mean_a, "mean_b": 100 * mean_b}
        out.update({k: 100 * entry[k] for k in ("mean_diff", "ci_low", "ci_high")})
        out.update(p_value=entry["p_value"], n=entry["n"])
        return out

    per_task = {t: scaled(g, paired[t]["a"].mean(), paired[t]["b"].mean()) for t, g in zip(order, result["groups"])}
    average = scaled(result["average"], sum(paired[t]["a"].mean() for t in order) / len(order),
                     sum(paired[t]["b"].mean() for t in order) / len(order))
    return {"tasks": per_task, "average": average}


def _identity(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KvbenchError(f"{path} is missing or not valid JSON ({exc}); pass a finished run folder") from None
    method = run.get("method") or {}
    model = run.get("model") or {}
    return {"run_dir": str(run_dir), "model": model.get("name"), "benchmark": run.get("benchmark"),
            "method": method.get("name"), "budget": method.get("budget"), "status": run.get("status")}


def compare_runs(run_a: str | Path, run_b: str | Path, confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
                 n_permutations: int = N_PERMUTATIONS, seed: int = SEED) -> dict:
    """`compare_samples` of two run folders, plus what was compared and how (JSON-ready)."""
    dirs = [Path(run_a), Path(run_b)]
    for path in dirs:
        if not path.is_dir():
            raise KvbenchError(f"run folder {str(path)!r} does not exist; pass two run folders (with run.json)")
    ids = [_identity(d) for d in dirs]
    if ids[0]["benchmark"] != ids[1]["benchmark"]:
        raise KvbenchError(f"cannot pair a {ids[0]['benchmark']} run with a {ids[1]['benchmark']} run; "
                           f"compare runs of the same benchmark")
    result = compare_samples(read_sample_scores(dirs[0]), read_sample_scores(dirs[1]), (str(dirs[0]), str(dirs[1])),
                             confidence=confidence, n_resamples=n_resamples, n_permutations=n_permutations, seed=seed)
    return {"a": ids[0], "b": ids[1], "difference": "A - B, score points (0-100)", "confidence": confidence,
            "ci": "paired percentile bootstrap", "test": "two-sided paired sign-flip permutation",
            "n_resamples": n_resamples, "n_permutations": n_permutations, "seed": seed, **result}


def _label(identity: dict) -> str:
    budget = "" if identity["budget"] is None or str(identity["method"]).lower() == "fullkv" else f" {identity['budget']}"
    return f"{identity['method']}{budget}"


def format_comparison(result: dict) -> str:
    """A Markdown table of a `compare_runs` result (tasks, then the average)."""
    rows = {**result["tasks"], "Avg.": result["average"]}
    frame = pd.DataFrame([{"Task": task, **{k: v[k] for k in KEYS}} for task, v in rows.items()])
    pct = int(round(100 * result["confidence"]))
    frame = frame.rename(columns={"mean_a": "A", "mean_b": "B", "mean_diff": "A - B", "ci_low": f"{pct}% CI low",
                                  "ci_high": f"{pct}% CI high", "p_value": "p"})
    head = (f"A = {_label(result['a'])} ({result['a']['run_dir']})\nB = {_label(result['b'])} "
            f"({result['b']['run_dir']})\n\n")
    table = frame.to_markdown(index=False, floatfmt=("", ".2f", ".2f", "+.2f", "+.2f", "+.2f", ".4f", ""))
    note = (f"\n\nScore points (0-100). CI: {result['ci']} ({result['n_resamples']} resamples); p: "
            f"{result['test']} test ({result['n_permutations']} permutations), seed {result['seed']}.")
    return head + table + note + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.compare",
                                     description="Paired comparison of two runs on the same samples: mean "
                                                 "difference A - B with a bootstrap CI and a permutation p-value.")
    parser.add_argument("run_a", help="run folder A (holds run.json and sample_scores.jsonl)")
    parser.add_argument("run_b", help="run folder B, scored on the same samples")
    parser.add_argument("--out", help="also write the result as JSON to this file")
    parser.add_argument("--confidence", type=float, default=CONFIDENCE, help="CI level (default 0.95)")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES, help=f"bootstrap resamples ({N_RESAMPLES})")
    parser.add_argument("--permutations", type=int, default=N_PERMUTATIONS,
                        help=f"sign-flip permutations ({N_PERMUTATIONS})")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed (default 0)")
    args = parser.parse_args(argv)
    try:
        result = compare_runs(args.run_a, args.run_b, args.confidence, args.resamples, args.permutations, args.seed)
        print(format_comparison(result))
        if args.out:
            write_json_atomic(args.out, result)
            print(f"wrote {args.out}")
    except KvbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
