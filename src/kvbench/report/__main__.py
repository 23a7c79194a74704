"""`python -m kvbench.report RESULTS... [--out DIR] [--format md,latex,csv] [--ci pm|range|none]`.

Prints the Markdown tables and writes every table (in the chosen formats) and figure (PNG + PDF) into --out.
Scores carry 95% bootstrap CIs from each run's sample_scores.jsonl; warnings (skipped runs, collisions) are
printed once each, one line each, on stderr.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.atomic import atomic_write, write_error
from kvbench.report.collect import budget_order, collect, is_fullkv, layer_allocations, method_sort_key
from kvbench.report.query_gap import query_gap_markdown
from kvbench.report.figures import budget_curve, layer_allocation, score_vs_bytes
from kvbench.report.tables import (budget_label, kv_mib_label, longbench_e_table, longbench_table, markdown_frame,
                                   paper_comparison)

_FORMAT_NAMES = {"md": "markdown", "markdown": "markdown", "latex": "latex", "tex": "latex", "csv": "csv"}
_SUFFIX = {"markdown": "md", "latex": "tex", "csv": "csv"}
_LANGUAGE_NAMES = {"en": "English", "zh": "Chinese"}


def _formats(text: str) -> list[str]:
    """Parse '--format md,latex,csv' into the table module's format names."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in _FORMAT_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown format(s) {unknown or text!r}; use a comma list of md, latex, csv")
    return list(dict.fromkeys(_FORMAT_NAMES[n] for n in names))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.report",
        description="Tables (papers' layout), figures and a paper-vs-ours comparison from kvbench result folders.")
    parser.add_argument("results", nargs="+", help="run folders, or folders containing them (e.g. results/)")
    parser.add_argument("--out", default="results/report", help="where to write tables and figures "
                                                                "(default: results/report)")
    parser.add_argument("--format", dest="formats", type=_formats, default=_formats("md,latex,csv"),
                        help="table formats to write, comma separated: md, latex, csv (default: all)")
    parser.add_argument("--ci", choices=["pm", "range", "none"], default="pm",
                        help="show 95%% CIs as score ± half-width (pm, default), as [low, high] (range), or not")
    return parser


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(text)).strip("_")


def _write_longbench_tables(df: pd.DataFrame, out: Path, formats: list[str], ci: str | None) -> list[Path]:
    """Every LongBench table that the results support (benchmark x language x absolute/relative), and the
    LongBench-E tables by length bucket."""
    written = []
    for benchmark in ("longbench", "longbench_e"):
        for language in ("en", "zh"):
            for relative in (False, True):
                name = f"{benchmark}_{language}{'_relative' if relative else ''}"
                try:
                    tables = {fmt: longbench_table(df, language, fmt, relative, benchmark, ci) for fmt in formats}
                    markdown = tables.get("markdown") or longbench_table(df, language, "markdown", relative,
                                                                         benchmark, ci)
                except KvbenchError as exc:
                    if relative and "FullKV" in str(exc):  # say why the percent view is missing
                        print(f"(skipped {name}: {exc})\n", file=sys.stderr)
                    continue
                view = "percent of FullKV" if relative else "scores"
                print(f"## {benchmark} ({_LANGUAGE_NAMES[language]}), {view}\n\n{markdown}")
                written += [atomic_write(out / f"{name}.{_SUFFIX[fmt]}", text) for fmt, text in tables.items()]
    for language in ("en", "zh"):
        name = f"longbench_e_{language}_by_length"
        try:
            tables = {fmt: longbench_e_table(df, language, fmt, ci) for fmt in formats}
            markdown = tables.get("markdown") or longbench_e_table(df, language, "markdown", ci)
        except KvbenchError as exc:
            if "LongBench-E run" in str(exc):
                print(f"(skipped {name}: {exc})\n", file=sys.stderr)
            continue
        print(f"## longbench_e ({_LANGUAGE_NAMES[language]}) by input length\n\n{markdown}")
        written += [atomic_write(out / f"{name}.{_SUFFIX[fmt]}", text) for fmt, text in tables.items()]
    return written


def _needle_summary(df: pd.DataFrame, out: Path) -> list[Path]:
    """A short Markdown list of needle runs: the papers' score and the retrieval score, in percent, with CIs."""
    needle = df[df["benchmark"] == "needle"]
    if needle.empty:
        return []
    # Papers' order: model, then budget (FullKV first), then method.
    labels = pd.Series([budget_label(b, r) for b, r in zip(needle["budget"], needle["compression_ratio"])],
                       index=needle.index)
    order = sorted(needle.index, key=lambda i: (needle.at[i, "model"], budget_order(labels[i]),
                                                 method_sort_key(needle.at[i, "method"])))
    needle, labels = needle.loc[order], labels[order]

    def ci(low: str, high: str) -> list[str]:
        return [f"[{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else "-" for lo, hi in zip(needle[low], needle[high])]

    needles = needle["protocol"].map(lambda p: "multi" if str(p).endswith("_multineedle") else "single")
    frame = pd.DataFrame({"Model": needle["model"], "Method": needle["method"], "Needles": needles, "Budget": labels,
                          "KV MiB": needle["kv_bytes_mean"].map(kv_mib_label), "Score": needle["score"].astype(float),
                          "95% CI": ci("ci_low", "ci_high"), "Retrieval": needle["retrieval"].astype(float),
                          "Retrieval 95% CI": ci("retrieval_ci_low", "retrieval_ci_high"), "n": needle["n"].astype(str),
                          "Status": needle["status"].map(lambda s: "" if s == "complete" else s)})
    text = markdown_frame(frame) + "\n"
    text += ("\nScore: the papers' heatmap score (share of the expected answer's words in the response). Retrieval: "
             "share of cells whose response names the needle's key facts (what measures retrieval).\n")
    print(f"## Needle-in-a-Haystack (in percent)\n\n{text}")
    return [atomic_write(out / "needle.md", text)]


def _write_figures(df: pd.DataFrame, results: list[str], out: Path) -> list[Path]:
    """All figures the results support; a figure that does not apply is skipped with its reason."""
    written = []
    for name, draw in (("budget_curve", budget_curve), ("score_vs_bytes", score_vs_bytes)):
        try:
            written += draw(df, out / name)
        except KvbenchError as exc:
            print(f"(skipped {name}: {exc})", file=sys.stderr)
    alloc = layer_allocations(results)
    alloc = alloc[~alloc["method"].map(is_fullkv)]
    for (model, benchmark, budget), _ in alloc.groupby(["model", "benchmark", "budget"]):
        stem = out / f"layer_allocation_{_slug(model)}_{benchmark}_b{budget_label(budget)}"
        written += layer_allocation(alloc, stem, model=model, budget=budget, benchmark=benchmark)
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the report; returns 0 on success, 2 on a user error (message on stderr)."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    ci = None if args.ci == "none" else args.ci
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return _report(args, out, ci)
            finally:
                for message in dict.fromkeys(str(w.message) for w in caught):  # each table warns: say it once
                    print(f"warning: {message}", file=sys.stderr)
    except KvbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder a figure writer makes itself (atomic writes say so as a KvbenchError)
        print(f"error: {write_error(exc, exc.filename or out)}", file=sys.stderr)
        return 2


def _report(args, out: Path, ci: str | None) -> int:
    """Collect, print and write every table and figure; returns the exit status."""
    df = collect(args.results)
    written = [atomic_write(out / "results.csv", df.to_csv(index=False))]
    written += _write_longbench_tables(df, out, args.formats, ci)
    written += _needle_summary(df, out)
    gap = query_gap_markdown(df)  # per method: aware minus agnostic (LongBench average, needle)
    if gap:
        print(f"## Query-aware gap\n\n{gap}")
        written.append(atomic_write(out / "query_gap.md", gap))
    comparison = paper_comparison(df)
    print(f"## Paper vs ours\n\n{comparison}")
    written.append(atomic_write(out / "paper_comparison.md", comparison))
    written += _write_figures(df, args.results, out)
    from kvbench.ruler.report import write_ruler_report  # RULER's own tables and figures
    written += write_ruler_report(args.results, out, args.formats)
    from kvbench.longgen.report import write_longgen_report  # long-output: score and generated length
    written += write_longgen_report(args.results, out)
    print(f"wrote {len(written)} files to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
