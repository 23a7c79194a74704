"""Figures: budget curve, score vs KV-cache bytes, score vs context length, and per-layer budget allocation.

A line is one method in one setting (query mode, decode schedule, variant: read from the columns, named in the
legend, e.g. "SnapKV (prefill)", "SnapKV (agnostic, every 16)": the schedule is always named); any benchmark's rows draw the budget curve and, scored per length, the length curve.

Budget curves carry 95% CI bands and score-vs-bytes points CI error bars, from the runs' sample_scores.jsonl.

Every function writes `<out>.png` (150 dpi) and `<out>.pdf` atomically and returns both paths. `out` may be
given with or without a `.png`/`.pdf` suffix. Figures are drawn on `matplotlib.figure.Figure` objects
directly (no pyplot), so they work headless and leave no global state behind.
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from kvbench.errors import KvbenchError
from kvbench.benchmark import get
from kvbench.atomic import atomic_write
from kvbench.labels import is_fullkv, method_sort_key, setting_label
from kvbench.report.collect import task_samples
from kvbench.stats import confidence_intervals
from kvbench.report.tables import abbreviations, budget_label

METHOD_STYLE = {  # colour-blind-safe palette (Okabe-Ito); DynamicKV is the emphasised method
    "FullKV": {"color": "#000000", "marker": "*"},
    "StreamingLLM": {"color": "#999999", "marker": "v"},
    "H2O": {"color": "#E69F00", "marker": "s"},
    "SnapKV": {"color": "#56B4E9", "marker": "^"},
    "PyramidKV": {"color": "#009E73", "marker": "D"},
    "DynamicKV": {"color": "#D55E00", "marker": "o"},
}
_OTHER_COLOURS = ["#CC79A7", "#0072B2", "#F0E442", "#882255", "#44AA99"]
_MIB = 2 ** 20


def _style(method: str) -> dict:
    """Colour and marker of a method; unknown methods get stable colours from a spare palette."""
    method = method.split(" (")[0]  # a line label: the method's colour in every setting
    if method in METHOD_STYLE:
        return METHOD_STYLE[method]
    return {"color": _OTHER_COLOURS[sum(map(ord, method)) % len(_OTHER_COLOURS)], "marker": "P"}


def _emphasis(method: str) -> dict:
    """DynamicKV drawn thick and on top; the others thinner, so the paper's method stands out."""
    if method == "DynamicKV":
        return {"linewidth": 2.6, "zorder": 5, "alpha": 1.0, "markersize": 6}
    return {"linewidth": 1.4, "zorder": 3, "alpha": 0.85, "markersize": 5}


def _save(fig: Figure, out: str | Path) -> list[Path]:
    """Write the figure as PNG and PDF next to each other (atomic writes)."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".pdf") else out
    written = []
    for fmt in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, bbox_inches="tight")
        written.append(atomic_write(stem.with_name(f"{stem.name}.{fmt}"), buffer.getvalue()))
    return written


def _grid(n_panels: int, max_cols: int, panel_size: tuple[float, float], share: bool = False):
    """A figure with n panels on a grid of at most `max_cols` columns; unused axes are hidden."""
    cols = min(n_panels, max_cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=share, sharey=share).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def line_label(row) -> str:
    """A legend entry: the method and its settings, the decode schedule always ("SnapKV (prefill)",
    "SnapKV (agnostic, every 16)")."""
    return f"{row['method']} ({setting_label(row)})"


def _layout(benchmark: str) -> dict:
    """A benchmark's table layout (`Benchmark.table_layout`; {} for one without, or whose class no longer imports)."""
    try:
        return get(benchmark).table_layout or {}
    except KvbenchError:
        return {}


def _part_tasks(benchmark: str, part: str | None) -> list[str] | None:
    """The papers' task list of one part (LongBench: a language) of a benchmark's table layout; None: all tasks."""
    layout = _layout(benchmark)
    return layout[part][1] if part in layout else None


def _pick_benchmark(df: pd.DataFrame, benchmark: str | None, fits, what: str) -> str:
    """The benchmark to draw: the one asked for, else the only one of the rows that `fits` (the papers' figures:
    the benchmark that declares them; lengths: the one scored per length), else the only one."""
    if benchmark is not None:
        return benchmark
    names = sorted(set(df["benchmark"]))
    fitting = [name for name in names if fits(name)]
    if len(fitting) == 1 or len(names) == 1:
        return (fitting or names)[0]
    raise KvbenchError(f"the rows hold several benchmarks ({', '.join(names)}); pass benchmark=... to pick {what}")


def _papers_figures(benchmark: str) -> bool:
    try:
        return get(benchmark).papers_figures
    except KvbenchError:
        return False


def _run_averages(df: pd.DataFrame, benchmark: str, language: str | None = "en",
                  by_length: bool = False) -> tuple[pd.DataFrame, dict]:
    """Per run (and length, with `by_length`): average score over the cells (task, length) every run of that model
    has, mean KV bytes, and the cell counts. `language` picks LongBench's tasks; None: every task.

    Averaging over a common cell set keeps points of one model comparable when runs cover different tasks.
    """
    data = df[df["benchmark"] == benchmark]
    tasks = _part_tasks(benchmark, language)
    if tasks is not None:
        data = data[data["task"].isin(tasks)]
    if data.empty:
        raise KvbenchError(f"no {benchmark} task scores to plot; collect {benchmark} runs first")
    length = data["length"] if "length" in data else pd.Series(pd.NA, index=data.index)
    # Common cells: tasks at each length (a point averages the same cells), or, along lengths, the same tasks.
    data = data.assign(cell=data["task"] if by_length else [f"{t}@{n}" for t, n in zip(data["task"], length)],
                       length=length,
                       line=[line_label(r) for _, r in data.iterrows()])
    rows, task_counts = [], {}
    for model, block in data.groupby("model", sort=True):
        common = set.intersection(*(set(cells) for _, cells in block.groupby("run_dir")["cell"]))
        if not common:
            raise KvbenchError(f"the {model} runs share no task, so their averages are not comparable; "
                               f"run the same tasks for every method")
        task_counts[model] = len({c.split("@")[0] for c in common})
        keys = ["run_dir", "length"] if by_length else ["run_dir"]
        for _, run in block[block["cell"].isin(common)].groupby(keys, dropna=False):
            first = run.iloc[0]
            low, high = _average_ci(first["run_dir"], run)
            rows.append({"model": model, "method": first["method"], "line": first["line"], "query": first.get("query"),
                         "budget": first["budget"], "length": first["length"], "score": run["score"].mean(),
                         "kv_bytes": run["kv_bytes_mean"].mean(), "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows), task_counts


def _average_ci(run_dir: str, run: pd.DataFrame) -> tuple[float, float]:
    """95% CI of a run's average over these cells (resampled within each task and length), from its
    sample_scores.jsonl; NaN when samples are missing or did not match scores.json (collect left its CI out)."""
    if "samples_ok" not in run or not run["samples_ok"].fillna(False).astype(bool).all():
        return math.nan, math.nan
    groups = [task_samples(run_dir, task, length) for task, length in zip(run["task"], run["length"])]
    if any(g is None for g in groups):
        return math.nan, math.nan
    return confidence_intervals([g.to_numpy() for g in groups])["average_ci"]


def _band(ax, x, low, high, method: str) -> None:
    """The CI of a line as a light band in the method's colour (skipped where no CI is known)."""
    known = ~(pd.isna(low) | pd.isna(high))
    if known.any():
        ax.fill_between(x[known], low[known], high[known], color=_style(method)["color"], alpha=0.15, linewidth=0,
                        zorder=1)


def _finish_legend(fig: Figure, axes, ncol_max: int = 7, location: str = "outside upper center") -> None:
    """One legend for the whole figure, above the panels, without duplicate entries."""
    handles, labels = {}, []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    labels.sort(key=lambda label: (method_sort_key(label.split(" = ")[-1].split(" (")[0]), label))
    fig.legend([handles[lb] for lb in labels], labels, loc=location,
               ncol=min(len(labels), ncol_max), frameon=False, fontsize=10)


def _budget_axis(ax, budgets) -> None:
    """Log2 x axis with a tick at every budget that was run."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(budgets)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([budget_label(b) for b in sorted(budgets)])


def budget_curve(df: pd.DataFrame, out: str | Path, benchmark: str | None = None,
                 language: str | None = "en") -> list[Path]:
    """Average score of a benchmark's runs (LongBench: the `language`'s tasks) against KV budget, one line per
    method and setting, FullKV as a dashed reference; one panel per model. `benchmark` None: the one of the rows
    that has the papers' figures (`Benchmark.papers_figures`), else the only one."""
    benchmark = _pick_benchmark(df, benchmark, _papers_figures, "one")
    runs, task_counts = _run_averages(df, benchmark, language)
    compressed = runs[~runs["method"].map(is_fullkv)]
    if compressed.empty:
        raise KvbenchError("a budget curve needs at least one compressed-method run (only FullKV was found)")
    models = sorted(runs["model"].unique())
    fig, axes = _grid(len(models), 2, (6.0, 4.2))
    for ax, model in zip(axes, models):
        block = runs[runs["model"] == model]
        compressed = block[~block["method"].map(is_fullkv)]
        for (method, label), line in sorted(compressed.groupby(["method", "line"]),
                                            key=lambda m: (method_sort_key(m[0][0]), m[0][1])):
            line = line.sort_values("budget")
            ax.plot(line["budget"], line["score"], label=label, **_style(method), **_emphasis(method))
            _band(ax, line["budget"].to_numpy(), line["ci_low"].to_numpy(), line["ci_high"].to_numpy(), method)
        for label, full in block[block["method"].map(is_fullkv)].groupby("line"):  # one reference per setting
            plain = label == line_label({"method": full["method"].iloc[0]})  # aware, prefill, the plain benchmark
            ax.axhline(full["score"].iloc[0], color="black", linestyle="--" if plain else ":",
                       linewidth=1.2, label=label, zorder=2)
            if pd.notna(full["ci_low"].iloc[0]):
                ax.axhspan(full["ci_low"].iloc[0], full["ci_high"].iloc[0], color="black", alpha=0.07, zorder=1)
        _budget_axis(ax, block["budget"].dropna().unique())
        ax.set_title(f"{model}, {benchmark}", fontsize=12)
        ax.set_xlabel("KV budget (tokens per head per layer)", fontsize=10)
        ax.set_ylabel(f"Average score ({task_counts[model]} tasks)", fontsize=10)
        ax.grid(True, alpha=0.3)
    _finish_legend(fig, axes)
    _ci_caption(fig, runs, "Bands")
    return _save(fig, out)


def _ci_caption(fig: Figure, runs: pd.DataFrame, what: str) -> None:
    if runs["ci_low"].notna().any():
        fig.text(0.5, -0.01, f"{what}: 95% bootstrap CI of the average (resampled within each task)",
                 ha="center", va="top", fontsize=8, color="#555555")


def _bytes_label(ax, x, y, text) -> None:
    """Budget label just above-left of a DynamicKV point (DynamicKV tends to be the top line, so this is clear)."""
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(-4, 7), ha="right", fontsize=8,
                color=METHOD_STYLE["DynamicKV"]["color"])


def score_vs_bytes(df: pd.DataFrame, out: str | Path, benchmark: str | None = None,
                   language: str = "en") -> list[Path]:
    """Average score against the KV-cache bytes actually kept (mean per sample), one point per method and budget.

    Points of one method are joined in budget order and labelled with their budget; x is logarithmic (MiB).
    `benchmark` None: as `budget_curve`.
    """
    benchmark = _pick_benchmark(df, benchmark, _papers_figures, "one")
    runs, task_counts = _run_averages(df, benchmark, language)
    runs = runs.dropna(subset=["kv_bytes"])
    if runs.empty:
        raise KvbenchError("no run recorded kv_bytes in its predictions, so there is nothing to plot against memory")
    models = sorted(runs["model"].unique())
    fig, axes = _grid(len(models), 2, (6.0, 4.2))
    for ax, model in zip(axes, models):
        block = runs[runs["model"] == model]
        for (method, label), line in sorted(block.groupby(["method", "line"]),
                                            key=lambda m: (method_sort_key(m[0][0]), m[0][1])):
            line = line.sort_values("kv_bytes")
            style = {**_style(method), **_emphasis(method)}
            if is_fullkv(method):  # a single reference point: a big star, no line
                style.update(markersize=12, linestyle="none")
            ax.plot(line["kv_bytes"] / _MIB, line["score"], label=label, **style)
            known = line["ci_low"].notna()
            if known.any():
                ax.errorbar(line["kv_bytes"][known] / _MIB, line["score"][known],
                            yerr=[(line["score"] - line["ci_low"])[known], (line["ci_high"] - line["score"])[known]],
                            fmt="none", ecolor=style["color"], elinewidth=1.0, capsize=3, alpha=0.8,
                            zorder=style["zorder"])
            if label == line_label({"method": "DynamicKV"}):  # every method ran the same budgets: one line is enough
                for _, point in line.iterrows():
                    _bytes_label(ax, point["kv_bytes"] / _MIB, point["score"], f"b={budget_label(point['budget'])}")
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.08)
        ax.set_title(model, fontsize=12)
        ax.set_xlabel("KV cache kept per sample (MiB, log scale)", fontsize=10)
        ax.set_ylabel(f"Average score ({task_counts[model]} tasks)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    _finish_legend(fig, axes)
    _ci_caption(fig, runs, "Error bars")
    return _save(fig, out)


def score_vs_length(df: pd.DataFrame, out: str | Path, benchmark: str | None = None) -> list[Path]:
    """Average score against context length (a benchmark scored per length, e.g. RULER), one line per method,
    budget and setting, with CI bands; one panel per model and query mode. `benchmark` None: the one of the rows
    scored per length."""
    scored_per_length = lambda name: df.loc[df["benchmark"] == name, "length"].notna().any()  # noqa: E731
    benchmark = _pick_benchmark(df, benchmark, scored_per_length, "one scored per length")
    runs, _ = _run_averages(df, benchmark, None, by_length=True)
    runs = runs.dropna(subset=["length"])
    if runs.empty or runs["length"].nunique() < 2:
        raise KvbenchError(f"score vs length needs {benchmark} runs at two or more lengths")
    panels = sorted(runs[["model", "query"]].drop_duplicates().itertuples(index=False))
    fig, axes = _grid(len(panels), 2, (6.0, 4.2))
    for ax, (model, query) in zip(axes, panels):
        block = runs[(runs["model"] == model) & (runs["query"] == query)]
        for (method, label, budget), line in sorted(block.groupby(["method", "line", block["budget"].fillna(-1)]),
                                                    key=lambda m: (m[0][2], method_sort_key(m[0][0]), m[0][1])):
            line = line.sort_values("length")
            x = line["length"].astype(float).to_numpy()
            name = label if budget < 0 else f"{label}, {budget_label(budget)}"
            ax.plot(x, line["score"], label=name, linestyle="--" if is_fullkv(method) else "-", **_style(method),
                    **_emphasis(method))
            _band(ax, x, line["ci_low"].to_numpy(), line["ci_high"].to_numpy(), method)
        lengths = sorted(int(n) for n in block["length"].unique())
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_title(f"{model}, {benchmark}, query {query}", fontsize=12)
        ax.set_xlabel("context length (tokens)", fontsize=10)
        ax.set_ylabel("Average score", fontsize=10)
        ax.grid(True, alpha=0.3)
    _finish_legend(fig, axes, ncol_max=4)
    _ci_caption(fig, runs, "Bands")
    return _save(fig, out)


def _pick(alloc_df: pd.DataFrame, column: str, value, what: str):
    """The single model/budget to draw: the one asked for, or the only one present (else a clear error)."""
    present = sorted(v.item() if hasattr(v, "item") else v for v in alloc_df[column].dropna().unique())
    listed = ", ".join(budget_label(v) if column == "budget" else str(v) for v in present)
    if value is not None:
        if value not in present:
            raise KvbenchError(f"{what} {value!r} has no layer allocations; choose from {listed}")
        return value
    if len(present) != 1:
        raise KvbenchError(f"the allocations cover several {what}s ({listed}); pass {column}=... to pick one")
    return present[0]


def _distinct_allocations(block: pd.DataFrame) -> list[tuple[list[str], pd.DataFrame]]:
    """Lines of one panel, methods with identical allocations merged ('H2O = SnapKV'), so none hides another."""
    merged: dict[tuple, tuple[list[str], pd.DataFrame]] = {}
    for method, line in sorted(block.groupby("method"), key=lambda m: method_sort_key(m[0])):
        line = line.sort_values("layer")
        key = tuple(line["layer"]) + tuple(line["kept_mean"].round(3))
        merged.setdefault(key, ([], line))[0].append(method)
    return list(merged.values())


def layer_allocation(alloc_df: pd.DataFrame, out: str | Path, model: str | None = None,
                     budget: float | None = None, benchmark: str | None = None) -> list[Path]:
    """Tokens kept per head in each layer (x = layer), one panel per task, one line per method; DynamicKV emphasised.

    `alloc_df` is `layer_allocations()` output. FullKV is left out (it keeps the whole prompt and would flatten
    the scale). With several models, budgets or benchmarks, pass `model=` / `budget=` / `benchmark=`.
    """
    data = alloc_df[~alloc_df["method"].map(is_fullkv)]
    if "query" in data and not data.empty:  # one line per method and query mode
        data = data.assign(method=data.apply(line_label, axis=1))
    if data.empty:
        raise KvbenchError("no per-layer allocations of a compressed method; runs must record 'layer_kept'")
    model = _pick(data, "model", model, "model")
    data = data[data["model"] == model]
    benchmark = _pick(data, "benchmark", benchmark, "benchmark")
    data = data[data["benchmark"] == benchmark]
    budget = _pick(data, "budget", budget, "budget")
    data = data[data["budget"] == budget]
    papers_tasks = [task for _, papers in _layout(benchmark).values() for task in papers or []]  # LongBench's order
    order = {t: i for i, t in enumerate(papers_tasks)}
    tasks = sorted(data["task"].unique(), key=lambda t: (order.get(t, len(order)), t))
    fig, axes = _grid(len(tasks), 4, (3.6, 2.5), share=True)
    for ax, task in zip(axes, tasks):
        for methods, line in _distinct_allocations(data[data["task"] == task]):
            style = {"color": _style(methods[0])["color"], **_emphasis(methods[-1])}
            style.pop("markersize")
            ax.plot(line["layer"], line["kept_mean"], label=" = ".join(methods), **style)
        ax.set_title(abbreviations(benchmark).get(task, task), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[-min(len(axes), 4):]:  # the last panel of each column: tick labels and axis name
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("Layer", fontsize=9)
    fig.supylabel("Tokens kept per head", fontsize=10)
    _finish_legend(fig, axes, location="outside lower center")
    fig.suptitle(f"{model}, {benchmark}: tokens kept per layer at budget {budget_label(budget)}", fontsize=12)
    return _save(fig, out)
