"""RULER reports from result folders: the papers' table (methods x tasks + average, best in bold) per length, in
Markdown / LaTeX / CSV, and figures of the average score against context length and against the KV budget.

`python -m kvbench.ruler.report RESULTS... [--out DIR]`; `python -m kvbench.report` calls `write_ruler_report` too.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.jsonl import read_jsonl
from kvbench.labels import display_method, method_sort_key
from kvbench.report.collect import budget_label, budget_order
from kvbench.report.tables import kv_mib_label
from kvbench.ruler.constants import ALL_TASKS

SHORT = {"niah_single_1": "S1", "niah_single_2": "S2", "niah_single_3": "S3", "niah_multikey_1": "MK1",
         "niah_multikey_2": "MK2", "niah_multikey_3": "MK3", "niah_multivalue": "MV", "niah_multiquery": "MQ",
         "vt": "VT", "cwe": "CWE", "fwe": "FWE", "qa_1": "QA1", "qa_2": "QA2"}
COLUMNS = ["model", "method", "budget", "query", "template", "length", "task", "score", "n", "run_dir", "ratio",
           "kv_bytes"]


def _kv_bytes(run_dir: Path, task: str) -> dict[int, float]:
    """{length: mean kv_bytes held per sample} of one task's predictions (ids are `<length>_<index>`)."""
    path = run_dir / "predictions" / f"{task}.jsonl"
    if not path.is_file():
        return {}
    by_length: dict[int, list[float]] = {}
    for record in read_jsonl(path, "rerun that task"):
        length = str(record.get("_id", "")).split("_")[0]
        if length.isdigit() and isinstance(record.get("kv_bytes"), (int, float)):
            by_length.setdefault(int(length), []).append(record["kv_bytes"])
    return {length: sum(v) / len(v) for length, v in by_length.items()}


def collect_ruler(paths) -> pd.DataFrame:
    """One row per (run, length, task) of every finished RULER run at or below `paths`."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    rows = []
    for root in map(Path, paths):
        if not root.exists():
            raise KvbenchError(f"{root} does not exist; pass result folders, e.g. results/")
        for run_file in sorted([root / "run.json"] if (root / "run.json").exists() else root.rglob("run.json")):
            scores_file = run_file.parent / "scores.json"
            try:
                run = json.loads(run_file.read_text())
                scores = json.loads(scores_file.read_text()) if scores_file.exists() else {}
            except json.JSONDecodeError as err:
                print(f"(skipped {run_file.parent}: corrupt JSON, {err.msg})", file=sys.stderr)
                continue
            if scores.get("benchmark") != "ruler":
                continue
            config = run.get("config") or {}
            method_cfg = config.get("method") or {}
            method = display_method((run.get("method") or method_cfg).get("name", "?"))  # the registry's spelling
            budget = math.nan if method_cfg.get("budget_agnostic") else float(config.get("budget", math.nan))
            ratio = method_cfg.get("compression_ratio")  # it replaces the budget (kvbench.config.budget_text)
            ratio = math.nan if ratio is None or method_cfg.get("budget_agnostic") else float(ratio)
            kv = {}
            for length, part in scores.get("lengths", {}).items():
                for task, score in part.get("tasks", {}).items():
                    if score is None:
                        continue
                    if task not in kv:
                        kv[task] = _kv_bytes(run_file.parent, task)
                    rows.append({"model": (config.get("model") or {}).get("name", "?"), "method": method,
                                 "budget": budget, "query": scores.get("query", "aware"),
                                 "template": scores.get("template", ""), "length": int(length), "task": task,
                                 "score": float(score), "n": int(part.get("n", {}).get(task, 0)),
                                 "run_dir": str(run_file.parent), "ratio": ratio,
                                 "kv_bytes": kv[task].get(int(length), math.nan)})
    return pd.DataFrame(rows, columns=COLUMNS)


def _with_budget_cells(df: pd.DataFrame) -> pd.DataFrame:
    """`budget` as the Budget cell (`Full`, `128`, `ratio 0.9`): runs asked with a ratio are named after it."""
    ratio = df["ratio"] if "ratio" in df else pd.Series(math.nan, index=df.index)
    return df.assign(budget=[budget_label(b, r) for b, r in zip(df["budget"].astype(float), ratio.astype(float))])


def ruler_table(df: pd.DataFrame, length: int | None = None, fmt: str = "markdown") -> str:
    """Methods (rows: model, query, budget, method) x tasks and the average, at one length (None: mean over the
    lengths each run has). The best score of each column among the compressed methods of the same model, query mode
    and budget is bold (all rows if no compressed method; nothing when a single row competes)."""
    data = df if length is None else df[df["length"] == length]
    if data.empty:
        raise KvbenchError(f"no RULER results{'' if length is None else f' at length {length}'}")
    tasks = [t for t in ALL_TASKS if t in set(data["task"])]
    keys = ["model", "query", "budget", "method"]
    data = _with_budget_cells(data)
    if "kv_bytes" not in data:
        data = data.assign(kv_bytes=math.nan)
    wide = data.groupby(keys + ["task"])["score"].mean().unstack("task").reindex(columns=tasks)
    wide["Avg."] = wide[tasks].mean(axis=1, skipna=False)
    kv_mib = data.groupby(keys)["kv_bytes"].mean().map(kv_mib_label)
    wide = wide.reset_index()
    wide["KV MiB"] = [kv_mib[tuple(wide.loc[i, keys])] for i in wide.index]
    wide = wide.iloc[sorted(range(len(wide)), key=lambda i: (wide.at[i, "model"], wide.at[i, "query"],
                                                              budget_order(wide.at[i, "budget"]),
                                                              method_sort_key(wide.at[i, "method"])))]
    wide = wide.reset_index(drop=True)
    value_cols = tasks + ["Avg."]
    compressed = wide["method"] != "FullKV"
    # Best per (model, query, budget) among its compressed methods (a FullKV-only table: among all rows).
    group = wide[["model", "query", "budget"]].astype(str).agg("|".join, axis=1)
    pool = wide[compressed] if compressed.any() else wide
    best = {g: {c: part[c].max() for c in value_cols} for g, part in pool.groupby(group[pool.index])
            if len(part) > 1}  # a lone row is not "best" of anything
    header = ["Model", "Query", "Budget", "Method", "KV MiB"] + [SHORT[t] for t in tasks] + ["Avg."]
    body = []
    for i, row in wide.iterrows():
        cells = [str(row["model"]), str(row["query"]), row["budget"], str(row["method"]), row["KV MiB"]]
        for c in value_cols:
            v = row[c]
            text = "-" if pd.isna(v) else f"{v:.2f}"
            if fmt != "csv" and not pd.isna(v) and (compressed[i] or not compressed.any()) \
                    and v == best.get(group[i], {}).get(c):
                text = f"**{text}**" if fmt == "markdown" else f"\\textbf{{{text}}}"
            cells.append(text)
        body.append(cells)
    if fmt == "csv":
        return pd.DataFrame(body, columns=header).to_csv(index=False)
    if fmt == "latex":
        lines = ["\\begin{tabular}{" + "l" * 5 + "r" * len(value_cols) + "}", "\\toprule",
                 " & ".join(header) + " \\\\", "\\midrule"]
        lines += [" & ".join(c.replace("_", "\\_") for c in cells) + " \\\\" for cells in body]
        return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in body]) \
        + "\n"


def averages(df: pd.DataFrame) -> pd.DataFrame:
    """Average over tasks per (model, query, method, budget, length), with how many tasks it averages."""
    grouped = _with_budget_cells(df).groupby(["model", "query", "method", "budget", "length"])
    return grouped["score"].agg(["mean", "count"]).rename(columns={"mean": "avg", "count": "tasks"}).reset_index()


def _figure(plot, stem: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot(plt)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in out:
        fig.savefig(path, bbox_inches="tight", dpi=150)
    plt.close(fig)
    return out


def _mode_panels(modes: list[str], xlabel: str, draw):
    """A figure function for `_figure`: one panel per query mode on a log2 x axis, `draw(ax, mode)` fills each."""
    def plot(plt):
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.6), squeeze=False, sharey=True)
        for ax, mode in zip(axes[0], modes):
            ax.set_xscale("log", base=2)  # before `draw`, which may set its own ticks
            draw(ax, mode)
            ax.set_title(f"RULER, query {mode}")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("average score")
        axes[0][-1].legend(fontsize=7, loc="best")
        return fig
    return plot


def score_vs_length(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Average RULER score against context length, one line per method (and budget), one panel per query mode."""
    avg = averages(df)
    if avg["length"].nunique() < 2:
        raise KvbenchError("score vs length needs runs at two or more lengths")

    def draw(ax, mode):
        part = avg[avg["query"] == mode]
        for (method, budget), line in sorted(part.groupby(["method", "budget"]),
                                             key=lambda kv: (method_sort_key(kv[0][0]), budget_order(kv[0][1]))):
            line = line.sort_values("length")
            label = method if budget == "Full" else f"{method} ({budget})"
            ax.plot(line["length"], line["avg"], marker="o", label=label,
                    linestyle="--" if method == "FullKV" else "-")
        lengths = sorted(part["length"].unique())
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])

    return _figure(_mode_panels(sorted(avg["query"].unique()), "context length (tokens)", draw), stem)


def score_vs_budget(df: pd.DataFrame, stem: Path) -> list[Path]:
    """Average RULER score (over tasks and lengths) against the KV budget, one line per method."""
    avg = averages(df).groupby(["query", "method", "budget"])["avg"].mean().reset_index()
    tokens = avg["budget"].map(lambda b: budget_order(b)[0] == 1)  # token budgets (ratios have no token axis)
    compressed = avg[tokens].assign(budget=lambda f: f["budget"].astype(float))
    if compressed["budget"].nunique() < 2:
        raise KvbenchError("score vs budget needs compressed runs at two or more budgets")

    def draw(ax, mode):
        part = compressed[compressed["query"] == mode]
        for method, line in sorted(part.groupby("method"), key=lambda kv: method_sort_key(kv[0])):
            line = line.sort_values("budget")
            ax.plot(line["budget"], line["avg"], marker="o", label=method)
        full = avg[(avg["query"] == mode) & (avg["method"] == "FullKV")]
        if not full.empty:
            ax.axhline(float(full["avg"].iloc[0]), color="black", linestyle="--", label="FullKV")

    return _figure(_mode_panels(sorted(avg["query"].unique()), "KV budget (tokens per head)", draw), stem)


_SUFFIX = {"markdown": "md", "latex": "tex", "csv": "csv"}


def write_ruler_report(paths, out: Path, formats=("markdown", "latex", "csv"), echo: bool = True) -> list[Path]:
    """Every RULER table and figure the results support, written under `out`; [] when there is no RULER run."""
    df = collect_ruler(paths)
    if df.empty:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for length in sorted(df["length"].unique()) + [None]:
        name = f"ruler_{length}" if length is not None else "ruler_mean"
        for fmt in formats:
            path = out / f"{name}.{_SUFFIX[fmt]}"
            path.write_text(ruler_table(df, None if length is None else int(length), fmt))
            written.append(path)
        if echo:
            title = f"length {length}" if length is not None else "mean over lengths"
            print(f"## RULER, {title} (scores x100; best compressed method in bold)\n\n"
                  f"{ruler_table(df, None if length is None else int(length))}")
    for name, draw in (("ruler_score_vs_length", score_vs_length), ("ruler_score_vs_budget", score_vs_budget)):
        try:
            written += draw(df, out / name)
        except KvbenchError as exc:
            if echo:
                print(f"(skipped {name}: {exc})", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvbench.ruler.report",
                                     description="RULER tables and figures from kvbench result folders")
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", default="results/report")
    args = parser.parse_args(argv)
    try:
        written = write_ruler_report(args.results, Path(args.out))
    except KvbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not written:
        print("error: no finished RULER run found", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
