"""`python -m kvbench.report RESULTS... [--out DIR] [--format md,latex,csv]`.

Prints the Markdown tables and writes every table (in the chosen formats) and figure (PNG + PDF) into --out.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.atomic import atomic_write
from kvbench.report.collect import collect, layer_allocations, method_sort_key
from kvbench.report.figures import budget_curve, layer_allocation, score_vs_bytes
from kvbench.report.tables import budget_label, markdown_frame, longbench_table, paper_comparison

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
    return parser


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", str(text)).strip("_")


def _write_longbench_tables(df: pd.DataFrame, out: Path, formats: list[str]) -> list[Path]:
    """Every LongBench table that the results support (benchmark x language x absolute/relative)."""
    written = []
    for benchmark in ("longbench", "longbench_e"):
        for language in ("en", "zh"):
            for relative in (False, True):
                name = f"{benchmark}_{language}{'_relative' if relative else ''}"
                try:
                    tables = {fmt: longbench_table(df, language, fmt, relative, benchmark) for fmt in formats}
                    markdown = tables.get("markdown") or longbench_table(df, language, "markdown", relative, benchmark)
                except KvbenchError as exc:
                    if relative and "FullKV" in str(exc):  # say why the percent view is missing
                        print(f"(skipped {name}: {exc})\n", file=sys.stderr)
                    continue
                view = "percent of FullKV" if relative else "scores"
                print(f"## {benchmark} ({_LANGUAGE_NAMES[language]}), {view}\n\n{markdown}")
                written += [atomic_write(out / f"{name}.{_SUFFIX[fmt]}", text) for fmt, text in tables.items()]
    return written


def _needle_summary(df: pd.DataFrame, out: Path) -> list[Path]:
    """A short Markdown list of needle runs (score in percent)."""
    needle = df[df["benchmark"] == "needle"]
    if needle.empty:
        return []
    # Papers' order: model, then budget (FullKV first), then method.
    order = sorted(needle.index, key=lambda i: (needle.at[i, "model"], not pd.isna(needle.at[i, "budget"]),
                                                 needle.at[i, "budget"] if not pd.isna(needle.at[i, "budget"]) else 0,
                                                 method_sort_key(needle.at[i, "method"])))
    needle = needle.loc[order]
    frame = pd.DataFrame({"Model": needle["model"], "Method": needle["method"],
                          "Budget": needle["budget"].map(budget_label), "Score": needle["score"].astype(float),
                          "n": needle["n"].astype(str)})
    text = markdown_frame(frame) + "\n"
    print(f"## Needle-in-a-Haystack (score in percent)\n\n{text}")
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
    alloc = alloc[alloc["method"] != "FullKV"]
    for (model, benchmark, budget), _ in alloc.groupby(["model", "benchmark", "budget"]):
        stem = out / f"layer_allocation_{_slug(model)}_{benchmark}_b{budget_label(budget)}"
        written += layer_allocation(alloc, stem, model=model, budget=budget, benchmark=benchmark)
    return written


def main(argv: list[str] | None = None) -> int:
    """Run the report; returns 0 on success, 2 on a user error (message on stderr)."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            df = collect(args.results)
        written = [atomic_write(out / "results.csv", df.to_csv(index=False))]
        written += _write_longbench_tables(df, out, args.formats)
        written += _needle_summary(df, out)
        comparison = paper_comparison(df)
        print(f"## Paper vs ours\n\n{comparison}")
        written.append(atomic_write(out / "paper_comparison.md", comparison))
        written += _write_figures(df, args.results, out)
        from kvbench.ruler.report import write_ruler_report  # RULER's own tables and figures
        written += write_ruler_report(args.results, out, args.formats)
    except KvbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
