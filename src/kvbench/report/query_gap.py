"""The query-aware gap: per method and budget, the score with the question compressed along with the context
(aware, the 2024 papers' protocol) minus the score with the context compressed before the question (agnostic).

Inputs are the rows of `collect` (one per run and task, with the `query` column). Runs pair when every other
setting column is the same (model, benchmark, method, budget, protocol, tag, decode schedule, variant). LongBench,
RULER and other benchmarks: the mean over the tasks (and lengths) both modes have (so a partial agnostic run is
compared on its own tasks only); needle: the mean heatmap score (the
papers') and the retrieval score (the share of cells naming the needle's key facts, what measures retrieval).
"""
from __future__ import annotations

import math
import pandas as pd

from kvbench.labels import decode_label, method_sort_key

GAP_COLUMNS = ["model", "method", "budget", "benchmark", "variant", "decode_interval", "tasks", "aware", "agnostic", "gap",
               "retrieval_aware", "retrieval_agnostic", "retrieval_gap"]
_PAIR = ["model", "method", "budget_key", "benchmark", "protocol", "tag", "decode_interval", "variant"]


def query_gap(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, budget, benchmark) that has both modes: aware, agnostic, gap = aware - agnostic."""
    if "query" not in df.columns or df.empty:
        return pd.DataFrame(columns=GAP_COLUMNS)
    defaults = {"protocol": "", "tag": "", "decode_interval": 0, "variant": "", "length": pd.NA}
    frame = df.assign(**{c: v for c, v in defaults.items() if c not in df})
    frame = frame.assign(budget_key=frame["budget"].fillna(-1.0),
                         cell=[f"{task}@{length}" for task, length in zip(frame["task"], frame["length"])],
                         **{c: frame[c].fillna("") for c in defaults if c != "length"})
    rows = []
    for (model, method, budget, bench, _, _, decode, variant), group in frame.groupby(_PAIR):
        by_mode = {mode: g.groupby("cell")["score"].mean() for mode, g in group.groupby("query")}
        if set(by_mode) != {"aware", "agnostic"}:
            continue
        tasks = sorted(set(by_mode["aware"].dropna().index) & set(by_mode["agnostic"].dropna().index))
        if not tasks:
            continue
        aware = float(by_mode["aware"][tasks].mean())
        agnostic = float(by_mode["agnostic"][tasks].mean())
        retrieval = {mode: float(g["retrieval"].mean()) if "retrieval" in g.columns else math.nan
                     for mode, g in group.groupby("query")}  # needle only; NaN for LongBench
        rows.append({"model": model, "method": method, "budget": math.nan if budget == -1.0 else budget,
                     "benchmark": bench, "variant": variant, "decode_interval": decode, "tasks": len(tasks), "aware": aware,
                     "agnostic": agnostic,
                     "gap": aware - agnostic, "retrieval_aware": retrieval["aware"],
                     "retrieval_agnostic": retrieval["agnostic"],
                     "retrieval_gap": retrieval["aware"] - retrieval["agnostic"]})
    out = pd.DataFrame(rows, columns=GAP_COLUMNS)
    if out.empty:
        return out
    order = sorted(out.index, key=lambda i: (out.at[i, "model"], out.at[i, "benchmark"], out.at[i, "variant"],
                                             out.at[i, "decode_interval"], method_sort_key(out.at[i, "method"]),
                                             -1 if pd.isna(out.at[i, "budget"]) else out.at[i, "budget"]))
    return out.loc[order].reset_index(drop=True)


def query_gap_markdown(df: pd.DataFrame) -> str:
    """The gap view as a Markdown table ("" when no method was run in both modes)."""
    gap = query_gap(df)
    if gap.empty:
        return ""
    lines = ["| Model | Benchmark | Variant | Decode | Method | Budget | Tasks | Aware | Agnostic | "
             "Gap (aware - agnostic) | Retrieval aware | Retrieval agnostic | Retrieval gap |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def number(value: float, sign: str = "") -> str:
        return "-" if pd.isna(value) else f"{value:{sign}.2f}"

    for r in gap.itertuples():
        budget = "Full" if pd.isna(r.budget) else f"{r.budget:g}"
        lines.append(f"| {r.model} | {r.benchmark} | {r.variant} | {decode_label(r.decode_interval)} | {r.method} | {budget} | {r.tasks} | "
                     f"{r.aware:.2f} | "
                     f"{r.agnostic:.2f} | {r.gap:+.2f} | {number(r.retrieval_aware)} | "
                     f"{number(r.retrieval_agnostic)} | {number(r.retrieval_gap, '+')} |")
    text = "\n".join(lines) + "\n"
    if gap["retrieval_gap"].notna().any():  # a benchmark with a retrieval score (the needle's)
        text += ("\nNeedle: Aware and Agnostic are the papers' heatmap score; Retrieval is the share of cells whose "
                 "answer names the needle's key facts (what measures retrieval).\n")
    return text
