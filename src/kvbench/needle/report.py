"""The needle's section of the report: one line per run with the papers' score and the retrieval score, with
CIs (`NeedlePlan.report_sections`)."""
from __future__ import annotations

import pandas as pd

from kvbench.report.collect import budget_order, method_sort_key
from kvbench.report.tables import budget_label, kv_mib_label, markdown_frame


def needle_summary(needle: pd.DataFrame) -> str:
    """A short Markdown list of the needle runs (rows of `kvbench.report.collect`): the papers' score and the
    retrieval score, in percent, with CIs."""
    # Papers' order: model, then budget (FullKV first), then method.
    labels = pd.Series([budget_label(b, r) for b, r in zip(needle["budget"], needle["compression_ratio"])],
                       index=needle.index)
    order = sorted(needle.index, key=lambda i: (needle.at[i, "model"], needle.at[i, "query"], needle.at[i, "variant"],
                                                 needle.at[i, "decode_interval"], budget_order(labels[i]),
                                                 method_sort_key(needle.at[i, "method"])))
    needle, labels = needle.loc[order], labels[order]

    def ci(low: str, high: str) -> list[str]:
        return [f"[{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else "-" for lo, hi in zip(needle[low], needle[high])]

    needles = needle["variant"].map(lambda v: "multi" if "multi-needle" in str(v) else "single")
    frame = pd.DataFrame({"Model": needle["model"], "Method": needle["method"], "Needles": needles, "Budget": labels,
                          "KV MiB": needle["kv_bytes_mean"].map(kv_mib_label), "Score": needle["score"].astype(float),
                          "95% CI": ci("ci_low", "ci_high"), "Retrieval": needle["retrieval"].astype(float),
                          "Retrieval 95% CI": ci("retrieval_ci_low", "retrieval_ci_high"),
                          "Query": needle["query"], "Decode": needle["decode_interval"].map(lambda d: d or ""),
                          "n": needle["n"].astype(str),
                          "Status": needle["status"].map(lambda s: "" if s == "complete" else s)})
    for column, default in (("Query", "aware"), ("Decode", "")):  # shown when they tell rows apart
        if frame[column].nunique() < 2 and (frame[column] == default).all():
            frame = frame.drop(columns=column)
    text = markdown_frame(frame) + "\n"
    text += ("\nScore: the papers' heatmap score (share of the expected answer's words in the response). Retrieval: "
             "share of cells whose response names the needle's key facts (what measures retrieval).\n")
    return text
