"""Long-output report: per run whose samples record their generated and reference lengths (`new_tokens`,
`answer_tokens` in sample_scores.jsonl: longgen's), the score with its CI and the mean generated length, compared
sample by sample with the FullKV run of the same model and settings (a method that makes outputs longer costs
decoding time).

`python -m kvbench.report.generated_length RESULTS... [--out DIR]`; `python -m kvbench.report` calls
`write_longgen_report`. It lives with the report (below nothing of the benchmark packages it reads run folders of).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from kvbench.atomic import atomic_write
from kvbench.errors import KvbenchError
from kvbench.labels import decode_label, display_method, method_sort_key
from kvbench.sample_rows import SAMPLE_SCORES_FILE, read_sample_scores
from kvbench.stats import bootstrap_ci


def _runs(paths) -> list[dict]:
    runs = []
    for root in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if not root.exists():
            raise KvbenchError(f"{root} does not exist; pass result folders, e.g. results/")
        for run_file in sorted([root / "run.json"] if (root / "run.json").exists() else root.rglob("run.json")):
            folder = run_file.parent
            try:
                run = json.loads(run_file.read_text())
            except json.JSONDecodeError as err:
                print(f"(skipped {folder}: corrupt JSON, {err.msg})", file=sys.stderr)
                continue
            if not (folder / SAMPLE_SCORES_FILE).is_file():
                continue
            samples = read_sample_scores(folder)
            if not {"new_tokens", "answer_tokens", "context_length"} <= set(samples.columns):
                continue  # not a long-output run: its samples have no reference length
            settings = run.get("settings") or {}
            full = bool((run.get("config") or {}).get("method", {}).get("budget_agnostic"))
            runs.append({"model": (run.get("model") or {}).get("name", "?"),
                         "method": display_method((run.get("method") or {}).get("name", "?")),
                         "budget": math.nan if full else float(run["config"].get("budget", math.nan)),
                         "full": full, "query": (settings.get("benchmark") or {}).get("query", "aware"),
                         "decode": int((run.get("method") or {}).get("decode_interval") or 0),
                         "same": json.dumps({k: v for k, v in settings.items() if k != "method"}, sort_keys=True),
                         "samples": samples, "run_dir": str(folder)})
    return runs


def longgen_frame(paths) -> pd.DataFrame:
    """One row per (run, task, context length): score and CI (x100), n, mean generated and reference tokens, and
    the generated length relative to FullKV's on the samples both ran (1.10 = 10 % longer)."""
    runs = _runs(paths)
    rows = []
    for run in runs:
        full = next((r for r in runs if r["full"] and r["same"] == run["same"]), None)
        for (task, length), part in run["samples"].groupby(["task", "context_length"]):
            low, high = bootstrap_ci(part["score"].to_numpy())
            ratio = math.nan
            if full is not None:
                joined = part.merge(full["samples"], on=["task", "id"], suffixes=("", "_full"))
                if len(joined) and joined["new_tokens_full"].sum() > 0:
                    ratio = joined["new_tokens"].sum() / joined["new_tokens_full"].sum()
            rows.append({"model": run["model"], "query": run["query"], "task": task, "length": int(length),
                         "budget": run["budget"], "method": run["method"], "decode": run["decode"],
                         "score": 100 * part["score"].mean(),
                         "ci_low": 100 * low, "ci_high": 100 * high, "n": len(part),
                         "new_tokens": part["new_tokens"].mean(), "answer_tokens": part["answer_tokens"].mean(),
                         "new_tokens_vs_fullkv": ratio, "run_dir": run["run_dir"]})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = sorted(frame.index, key=lambda i: (frame.at[i, "model"], frame.at[i, "query"], frame.at[i, "task"],
                                               frame.at[i, "length"], not math.isnan(frame.at[i, "budget"]),
                                               0 if math.isnan(frame.at[i, "budget"]) else frame.at[i, "budget"],
                                               method_sort_key(frame.at[i, "method"]), frame.at[i, "decode"]))
    return frame.loc[order].reset_index(drop=True)


def longgen_markdown(frame: pd.DataFrame) -> str:
    fmt = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)  # noqa
    lines = ["| Model | Query | Task | Length | Method | Budget | Decode | Score | 95% CI | n | Generated | Reference | "
             "Generated / FullKV |", "|" + "---|" * 13]
    for r in frame.itertuples():
        ci = f"[{r.ci_low:.2f}, {r.ci_high:.2f}]" if not math.isnan(r.ci_low) else "-"
        budget = "Full" if math.isnan(r.budget) else f"{r.budget:g}"
        lines.append(f"| {r.model} | {r.query} | {r.task} | {r.length} | {r.method} | {budget} | "
                     f"{decode_label(r.decode)} | "
                     f"{r.score:.2f} | "
                     f"{ci} | {r.n} | {fmt(r.new_tokens, '.1f')} | {fmt(r.answer_tokens, '.1f')} | "
                     f"{fmt(r.new_tokens_vs_fullkv, '.2f')} |")
    return "\n".join(lines) + "\n"


def write_longgen_report(paths, out: Path) -> list[Path]:
    frame = longgen_frame(paths)
    if frame.empty:
        return []
    text = longgen_markdown(frame)
    print(f"## Long-output (longgen): score and generated length\n\n{text}")
    return [atomic_write(Path(out) / "longgen.md", text), atomic_write(Path(out) / "longgen.csv",
                                                                      frame.to_csv(index=False))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.report.generated_length",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", default="reports")
    args = parser.parse_args(argv)
    try:
        written = write_longgen_report(args.results, Path(args.out))
    except KvbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out}/" if written else "no long-output runs found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
