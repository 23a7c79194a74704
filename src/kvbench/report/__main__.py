"""`python -m kvbench.report RESULTS... [--out DIR] [--format md,latex,csv] [--ci pm|range|none]`.

Prints the Markdown tables and writes every table (in the chosen formats) and figure (PNG + PDF) of every benchmark
(LongBench, RULER, needle and any other) into --out, plus `report.html`: one self-contained page with the sortable
tables, the figures and each run's settings.
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

from kvbench.benchmark import Benchmark, get
from kvbench.errors import KvbenchError
from kvbench.atomic import atomic_write, write_error
from kvbench.labels import decode_label, is_fullkv, method_sort_key
from kvbench.report.collect import budget_order, collect, layer_allocations
from kvbench.report.generated_length import write_longgen_report  # long outputs: generated length vs FullKV
from kvbench.report.html import markdown_html, write_html
from kvbench.report.query_gap import query_gap_markdown
from kvbench.report.sessions import write_cost_report, write_session_report
from kvbench.report.figures import budget_curve, layer_allocation, score_vs_bytes, score_vs_length
from kvbench.report.tables import (CLAMP_MARK, NoGroupScores, budget_label, build_table, clamp_note, clamp_text,
                                   group_table, kv_mib_label, markdown_frame, paper_comparison, render, table_parts)

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


def _table_views(df: pd.DataFrame):
    """(file name, title, build kwargs) of every table the results support: each benchmark's parts (LongBench:
    languages), each length and the mean over lengths (a benchmark scored per length), absolute and relative."""
    for benchmark in sorted(df["benchmark"].unique()):
        block = df[df["benchmark"] == benchmark]
        lengths = sorted(int(n) for n in block["length"].dropna().unique())
        for part in table_parts(df, benchmark):
            for length in (lengths + [None]) if lengths else [None]:
                for relative in (False, True):
                    at = "" if not lengths else ("_mean" if length is None else f"_{length}")
                    name = f"{benchmark}{f'_{part}' if part else ''}{at}" or benchmark
                    name += "_scores" if name == benchmark else ""
                    where = ", ".join(filter(None, [_LANGUAGE_NAMES.get(part, part), "" if not lengths else
                                                    ("mean over lengths" if length is None else f"length {length}")]))
                    title = f"{benchmark}{f' ({where})' if where else ''}, {'percent of FullKV' if relative else 'scores'}"
                    yield (name + ("_relative" if relative else ""), title,
                           {"benchmark": benchmark, "part": part, "relative": relative, "length": length})


def _write_tables(df: pd.DataFrame, out: Path, formats: list[str], ci: str | None,
                  html_parts: list) -> list[Path]:
    """Every benchmark table (see `_table_views`) in every format, then the tables a benchmark declares by a
    per-sample field (`Benchmark.group_table`: LongBench-E's by input length)."""
    written = []
    for name, title, view in _table_views(df):
        try:
            table = build_table(df, ci=ci, **view)
        except KvbenchError as exc:
            if view["relative"] and "FullKV" in str(exc):  # say why the percent view is missing
                print(f"(skipped {name}: {exc})\n", file=sys.stderr)
            continue
        print(f"## {title}\n\n{render(table, 'markdown')}")
        written += [atomic_write(out / f"{name}.{_SUFFIX[fmt]}", render(table, fmt)) for fmt in formats]
        html_parts.append((title, name, render(table, "html")))
    for benchmark in sorted(df["benchmark"].unique()):
        spec = _benchmark(benchmark).group_table
        for part in table_parts(df, benchmark) if spec else []:
            name = "_".join(filter(None, [benchmark, part, spec["stem"]]))
            title = f"{benchmark}{f' ({_LANGUAGE_NAMES.get(part, part)})' if part else ''} {spec['title']}"
            try:
                tables = {fmt: group_table(df, benchmark, part, fmt, ci) for fmt in formats}
                markdown = tables.get("markdown") or group_table(df, benchmark, part, "markdown", ci)
            except NoGroupScores as exc:
                print(f"(skipped {name}: {exc})\n", file=sys.stderr)
                continue
            print(f"## {title}\n\n{markdown}")
            written += [atomic_write(out / f"{name}.{_SUFFIX[fmt]}", text) for fmt, text in tables.items()]
            html_parts.append((title, name, markdown_html(markdown)))
    return written


def _benchmark_sections(df: pd.DataFrame, out: Path, html_parts: list) -> list[Path]:
    """The list of each benchmark that declares one (`Benchmark.summary_list`: the needle's), written to
    `<anchor>.md`."""
    written = []
    for name in sorted(df["benchmark"].unique()):
        benchmark = _benchmark(name)
        if benchmark.summary_list is None:
            continue
        spec = benchmark.summary_list
        text = _summary_list(df[df["benchmark"] == name], spec, list(benchmark.row_extras))
        print(f"## {spec['title']}\n\n{text}")
        written.append(atomic_write(out / f"{spec['anchor']}.md", text))
        html_parts.append((spec["title"], spec["anchor"], markdown_html(text)))
    return written


def _summary_list(rows: pd.DataFrame, spec: dict, extras: list[str]) -> str:
    """A short Markdown list of one benchmark's runs: its score and extra scores, in percent, with CIs."""
    # Papers' order: model, then budget (FullKV first), then method.
    labels = pd.Series([budget_label(b, r) for b, r in zip(rows["budget"], rows["compression_ratio"])],
                       index=rows.index)
    order = sorted(rows.index, key=lambda i: (rows.at[i, "model"], rows.at[i, "query"], rows.at[i, "variant"],
                                               rows.at[i, "decode_interval"], budget_order(labels[i]),
                                               method_sort_key(rows.at[i, "method"])))
    rows, labels = rows.loc[order], labels[order]
    clamped = pd.Series([clamp_text(rows.loc[[i]]) for i in rows.index], index=rows.index)  # held at the minimum
    labels = labels + clamped.map(lambda text: CLAMP_MARK if text else "")

    def ci(low: str, high: str) -> list[str]:
        return [f"[{lo:.2f}, {hi:.2f}]" if pd.notna(lo) else "-" for lo, hi in zip(rows[low], rows[high])]

    column, names, otherwise = spec.get("variants") or ("Variant", {}, "")
    variants = rows["variant"].map(lambda v: next((label for key, label in names.items() if key in str(v)),
                                                  otherwise if names else v))
    frame = pd.DataFrame({"Model": rows["model"], "Method": rows["method"], column: variants, "Budget": labels,
                          "KV MiB": rows["kv_bytes_mean"].map(kv_mib_label), "Score": rows["score"].astype(float),
                          "95% CI": ci("ci_low", "ci_high"),
                          **{k: v for extra in extras for k, v in (
                              (extra.capitalize(), rows[extra].astype(float)),
                              (f"{extra.capitalize()} 95% CI", ci(f"{extra}_ci_low", f"{extra}_ci_high")))},
                          "Query": rows["query"], "Decode": rows["decode_interval"].map(decode_label),
                          "n": rows["n"].astype(str),
                          "Status": rows["status"].map(lambda s: "" if s == "complete" else s)})
    if (frame["Query"] == "aware").all():  # shown when it tells rows apart; Decode always
        frame = frame.drop(columns="Query")
    notes = [spec["note"]] if spec.get("note") else []
    held = [(f"{rows.at[i, 'method']} {labels[i].rstrip(CLAMP_MARK)}", text) for i, text in clamped.items() if text]
    notes += [clamp_note(held)] if held else []
    return markdown_frame(frame) + "\n" + "".join(f"\n{note}\n" for note in notes)


def _benchmark(name: str) -> type[Benchmark]:
    """A benchmark's class; one that no longer imports is reported the generic way."""
    try:
        return get(name)
    except KvbenchError:
        return Benchmark


def _figures(df: pd.DataFrame):
    """(file stem, draw) of every figure that may apply: the papers' budget curve and score vs bytes for a benchmark
    that has them (`Benchmark.papers_figures`: LongBench), and for every other benchmark its budget curve and,
    scored per length, its score vs length."""
    for benchmark in sorted(set(df["benchmark"])):
        if _benchmark(benchmark).papers_figures:
            yield "budget_curve", lambda d, o, b=benchmark: budget_curve(d, o, b)
            yield "score_vs_bytes", lambda d, o, b=benchmark: score_vs_bytes(d, o, b)
            continue
        yield f"{benchmark}_score_vs_budget", lambda d, o, b=benchmark: budget_curve(d, o, b, None)
        if df.loc[df["benchmark"] == benchmark, "length"].notna().any():
            yield f"{benchmark}_score_vs_length", lambda d, o, b=benchmark: score_vs_length(d, o, b)


def _write_figures(df: pd.DataFrame, results: list[str], out: Path) -> list[Path]:
    """All figures the results support; a figure that does not apply is skipped with its reason."""
    written = []
    for name, draw in _figures(df):
        try:
            written += draw(df, out / name)
        except KvbenchError as exc:
            print(f"(skipped {name}: {exc})", file=sys.stderr)
    alloc = layer_allocations(results)
    alloc = alloc[~alloc["method"].map(is_fullkv).astype(bool)]
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
    parts: list[tuple[str, str, str]] = []  # (title, anchor, HTML) of report.html's sections
    written += _write_tables(df, out, args.formats, ci, parts)
    written += _benchmark_sections(df, out, parts)
    gap = query_gap_markdown(df)  # per method: aware minus agnostic (every benchmark run both ways)
    if gap:
        print(f"## Query-aware gap\n\n{gap}")
        written.append(atomic_write(out / "query_gap.md", gap))
        parts.append(("Query-aware gap", "query_gap", markdown_html(gap)))
    comparison = paper_comparison(df)
    print(f"## Paper vs ours\n\n{comparison}")
    written.append(atomic_write(out / "paper_comparison.md", comparison))
    parts.append(("Paper vs ours", "paper_comparison", markdown_html(comparison)))
    written += _write_figures(df, args.results, out)
    written += write_longgen_report(args.results, out)
    for title, anchor, paths in (("Multi-turn sessions", "sessions", write_session_report(args.results, out)),
                                 ("Score against generated length and peak KV bytes", "cost",
                                  write_cost_report(df, out))):
        written += paths
        parts += [(title, anchor, markdown_html(p.read_text(encoding="utf-8"))) for p in paths if p.suffix == ".md"]
    written.append(write_html(out / "report.html", parts, [p for p in written if p.suffix == ".png"],
                              sorted(set(df["run_dir"]))))
    print(f"wrote {len(written)} files to {out}/ (open {out / 'report.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
