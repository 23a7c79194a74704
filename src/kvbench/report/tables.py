"""Benchmark tables in the KV-compression papers' layout (LongBench, RULER and any other benchmark), and the
paper-vs-ours comparison.

Layout (PyramidKV / SnapKV / DynamicKV tables): rows grouped by model, then budget (FullKV once, at the top), then
method in the papers' order; columns are the tasks grouped by category (LongBench's categories; RULER's task order;
other benchmarks: their tasks as found), then the average. The query mode, decode schedule and variant are row keys
with their own columns (shown when they tell rows apart); a benchmark scored per context length (RULER) gets one
table per length and one over all lengths. The best
compressed method of each budget is bold in every column, with a dagger where a paired test on the same samples
does not show it better than the second best. Cells can carry 95% bootstrap CIs (from sample_scores.jsonl); every
table has an n column, a Status column for runs that did not complete and a Tag column for colliding runs.
Rendered by pandas (`to_markdown` via tabulate, `Styler.to_latex` via jinja2, `to_csv`) or as an HTML table.
"""
from __future__ import annotations

import html
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.benchmark import get
from kvbench.compare import compare_samples
from kvbench.labels import decode_label, is_fullkv, method_sort_key
from kvbench.report.collect import ReportWarning, budget_label, budget_order, run_samples, task_samples
from kvbench.sample_rows import SAMPLE_SCORES_FILE
from kvbench.stats import bootstrap_ci, confidence_intervals

AVG = "Avg."
FORMATS = ("markdown", "latex", "csv", "html")
_LANGUAGES = {"en": "English ", "zh": "Chinese "}  # parts named by a language (LongBench's)
CI_VIEWS = (None, "pm", "range")
ALPHA = 0.05  # significance level of the bold/dagger marks
_KEYS = ["model", "protocol", "tag", "query", "decode_interval", "variant", "budget_key", "method"]
_GROUP = _KEYS[:2] + _KEYS[3:-1]  # the methods of one model, protocol, setting and budget compete for bold
# Query and Variant are shown when they tell rows apart; Decode (`prefill` or `every N`) always.
_SETTINGS = {"query": "Query", "decode_interval": "Decode", "variant": "Variant"}


def _setting_text(level: str, value) -> str:
    """A setting's cell: the query mode or variant as given, the decode schedule as `prefill` or `every N`."""
    return decode_label(value) if level == "decode_interval" else "" if value in ("", None) else str(value)


@dataclass
class _Table:
    """A table ready to render: column groups, row labels, values, CIs, bold and dagger flags, n and status."""

    groups: list[tuple[str, list[str]]]          # (category, [task, ...]) in column order
    rows: pd.DataFrame                            # index = _KEYS, columns = tasks + [AVG], display-rounded
    low: pd.DataFrame                             # CI ends, same shape (NaN: no interval)
    high: pd.DataFrame
    bold: pd.DataFrame                            # same shape, True where the cell is bold
    dagger: pd.DataFrame                          # bold but not significantly better than the second
    n: pd.Series                                  # index = _KEYS: samples per task ("200" or "150-500")
    status: pd.Series                             # index = _KEYS: "" when complete
    kv_mib: pd.Series                             # index = _KEYS: mean KV cache held per sample, MiB ("-": unknown)
    decimals: int
    ci: str | None = None
    notes: list[str] = field(default_factory=list)
    run_dirs: pd.Series | None = None             # index = _KEYS: the row's run folder(s), for links
    clamped: pd.Series | None = None              # index = _KEYS: "33 tokens on 12 of 12 samples" ("": none held)
    short: dict = field(default_factory=dict)     # task -> the papers' short header (Benchmark.abbreviations)

    @property
    def columns(self) -> list[str]:
        return [task for _, tasks in self.groups for task in tasks] + [AVG]

    def shows(self, level: str) -> bool:
        """The Decode column (the schedule: `prefill` or `every N`) always appears; protocol / tag / query / variant
        columns only when they tell rows apart (or, query, variant and tag, when any row is not the default:
        agnostic, a variant, a tag)."""
        if level == "decode_interval":
            return True
        values = self.rows.index.get_level_values(level)
        default = {"tag": "", "query": "aware", "variant": ""}
        return values.nunique() > 1 or (level in default and (values != default[level]).any())


def abbreviations(benchmark: str) -> dict[str, str]:
    """The papers' short column headers of a benchmark's tasks and categories (`Benchmark.abbreviations`)."""
    try:
        return get(benchmark).abbreviations
    except KvbenchError:
        return {}


def _layout_tasks(layout: dict) -> set[str]:
    return {t for groups, papers in layout.values() for t in (papers or []) + [t for ts in groups.values() for t in ts]}


def _base_task(name: str, known: set[str]) -> str:
    """LongBench-E task names (`qasper_e`) share the base task's column (a task of the table layout)."""
    return name[:-2] if name.endswith("_e") and name[:-2] in known else name


def _layout(df: pd.DataFrame, benchmark: str) -> dict:
    """{part (LongBench: language): (task groups in column order, the papers' task list: the tasks of the part,
    whose count an average of all of them has; None: no published set)}: the benchmark's `table_layout`; a
    benchmark without one gets one part, its tasks as found."""
    try:
        layout = get(benchmark).table_layout
    except KvbenchError:
        layout = None
    if layout:
        return layout
    tasks = list(dict.fromkeys(df.loc[df["benchmark"] == benchmark, "task"]))
    return {"": ({benchmark: tasks}, None)}


def table_parts(df: pd.DataFrame, benchmark: str) -> list[str]:
    """The parts (LongBench: languages) of a benchmark that have tasks in these results."""
    layout = _layout(df, benchmark)
    present = set(df.loc[df["benchmark"] == benchmark, "task"].map(lambda t: _base_task(t, _layout_tasks(layout))))
    return [part for part, (groups, papers) in layout.items()
            if present & set(papers or [t for tasks in groups.values() for t in tasks])]


def _select(df: pd.DataFrame, part: str, benchmark: str) -> tuple[pd.DataFrame, list[tuple[str, list[str]]], int]:
    """The rows of one benchmark and part, the present tasks grouped by category in paper order, the papers' task
    count (None: no published count)."""
    missing = {"model", "benchmark", "method", "budget", "task", "score"} - set(df.columns)
    if missing:
        raise KvbenchError(f"the results table lacks columns {sorted(missing)}; build it with kvbench.report.collect()")
    layout = _layout(df, benchmark)
    if part not in layout:
        raise KvbenchError(f"{benchmark} tables have parts {' or '.join(map(repr, layout))}, not {part!r}"
                           + (" (language must be 'en' or 'zh')" if set(layout) == set(_LANGUAGES) else ""))
    categories, papers = layout[part]
    wanted = set(papers) if papers else {t for tasks in categories.values() for t in tasks}
    data = df[df["benchmark"] == benchmark].copy()
    data["task"] = data["task"].map(lambda t: _base_task(t, _layout_tasks(layout)))
    data = data[data["task"].isin(wanted)]
    if data.empty:
        what = _LANGUAGES.get(part, "")
        raise KvbenchError(f"no {what}{benchmark} tasks in these results; tasks found: {sorted(df['task'].unique())}")
    present = set(data["task"])
    short = abbreviations(benchmark)
    groups = [(short.get(cat, cat), [t for t in tasks if t in present and t in wanted])
              for cat, tasks in categories.items()]
    return data, [(cat, tasks) for cat, tasks in groups if tasks], len(papers) if papers else None


def _normalised(data: pd.DataFrame) -> pd.DataFrame:
    """Key columns filled (budget_key: the Budget cell, e.g. `Full`, `128`, `ratio 0.9`), optional columns
    defaulted for hand-built frames (`settings`: one kind for all)."""
    defaults = {"protocol": "", "tag": "", "status": "complete", "n": pd.NA, "ci_low": math.nan,
                "ci_high": math.nan, "samples_ok": False, "run_dir": "", "compression_ratio": math.nan,
                "settings": "", "kv_bytes_mean": math.nan, "query": "aware", "decode_interval": 0, "variant": "",
                "length": pd.NA, "budget_clamped_n": 0, "budget_lines_n": 0, "budget_held": ""}
    data = data.assign(**{col: value for col, value in defaults.items() if col not in data})
    keys = [budget_label(b, r) for b, r in zip(data["budget"].astype(float), data["compression_ratio"].astype(float))]
    return data.assign(budget_key=keys, protocol=data["protocol"].fillna(""),
                       tag=data["tag"].fillna("").astype(str), status=data["status"].fillna("unknown").astype(str),
                       settings=data["settings"].fillna("").astype(str), query=data["query"].fillna("aware").astype(str),
                       decode_interval=data["decode_interval"].fillna(0).astype(int),
                       variant=data["variant"].fillna("").astype(str))


def _over_lengths(data: pd.DataFrame) -> pd.DataFrame:
    """Rows of a benchmark scored per length, one per run and task over its lengths: the mean of the lengths'
    scores, n summed, and the CI of all the task's samples (when every length's samples matched)."""
    rows = []
    for (_, _), block in data.groupby(["run_dir", "task"], sort=False):
        row = block.iloc[0].to_dict()
        ok = bool(block["samples_ok"].fillna(False).astype(bool).all())
        values = task_samples(row["run_dir"], row["task"]) if ok else None
        low, high = bootstrap_ci(values.to_numpy()) if values is not None else (math.nan, math.nan)
        rows.append({**row, "score": float(block["score"].mean()), "n": block["n"].sum(min_count=1),
                     "kv_bytes_mean": float(block["kv_bytes_mean"].mean()), "length": pd.NA, "ci_low": low,
                     "ci_high": high, "samples_ok": values is not None})
    return pd.DataFrame(rows, columns=data.columns)


def _short_names(run_dirs: list[str]) -> dict[str, str]:
    """Each folder's shortest trailing path that no other folder of the list shares (`snapkv_128`, or
    `r1/llama/longbench/snapkv_128` when only a parent tells them apart)."""
    parts = {d: Path(d).parts for d in run_dirs}
    for depth in range(1, max(len(p) for p in parts.values()) + 1):
        names = {d: "/".join(p[-depth:]) for d, p in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {d: d for d in run_dirs}


def _resolve_collisions(data: pd.DataFrame) -> pd.DataFrame:
    """A row joins runs (e.g. tasks run into two folders) only when their settings fingerprints (run.json
    `fingerprint`: every setting that changes predictions, the task selection aside) agree. Runs of other settings,
    or two runs for one cell, are kept apart (by their tags, else by their folders in the Tag column) with one
    warning per row naming them."""
    data = data.copy()
    for (model, *_, budget_key, method), block in data.groupby([k for k in _KEYS if k != "tag"], sort=False):
        apart = False
        for _, same_tag in block.groupby("tag", sort=False):
            if same_tag["settings"].nunique() > 1 or same_tag.duplicated("task").any():
                names = _short_names(sorted(set(same_tag["run_dir"])))
                data.loc[same_tag.index, "tag"] = [names[d] for d in same_tag["run_dir"]]
                apart = True
        if apart or block.duplicated("task").any():
            dirs = sorted(set(block["run_dir"]))
            what = "runs of different settings" if block["settings"].nunique() > 1 else "runs"
            warnings.warn(f"collision: {len(dirs)} {what} give {method} budget {budget_key} for {model}: "
                          f"{', '.join(dirs)}; the tables keep them apart in a Tag column", ReportWarning,
                          stacklevel=4)
    return data


def _wide(data: pd.DataFrame, column: str, tasks: list[str]) -> pd.DataFrame:
    return data.set_index(_KEYS + ["task"])[column].unstack("task").reindex(columns=tasks)


def _row_order(index: pd.Index) -> list:
    """model, protocol, query mode, decode, variant, budget (FullKV first), method (papers' order), tag."""
    return sorted(index, key=lambda k: (*k[:2], k[3] != "aware", *k[3:6], budget_order(k[6]), method_sort_key(k[7]),
                                        k[2]))


def _n_label(counts: pd.Series) -> str:
    values = sorted({int(v) for v in counts.dropna()})
    if not values:
        return "?"
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def _samples_of(run_dirs: pd.Series, tasks: list[str], length=None) -> list[pd.Series] | None:
    """Per-sample scores (score points) of each task of one row (at one length), or None if any is missing."""
    out = []
    for task in tasks:
        run_dir = run_dirs.get(task)
        values = task_samples(run_dir, task, length) if isinstance(run_dir, str) and run_dir else None
        if values is None:
            return None
        out.append(values)
    return out


def _average_ci(run_dirs: pd.DataFrame, tasks: list[str], scores: pd.DataFrame,
                length=None) -> tuple[pd.Series, pd.Series]:
    """CI of each row's Avg. (resampling within each task, then averaging), where every task has samples
    that match the table's score (the per-task CI columns are NaN otherwise)."""
    low, high = pd.Series(math.nan, index=run_dirs.index), pd.Series(math.nan, index=run_dirs.index)
    for key in run_dirs.index:
        if scores.loc[key].isna().any():
            continue
        groups = _samples_of(run_dirs.loc[key], tasks, length)
        if groups is not None:
            low[key], high[key] = confidence_intervals([g.to_numpy() for g in groups])["average_ci"]
    return low, high


def _relative(values: pd.DataFrame) -> pd.DataFrame:
    """Percent of the FullKV row of the same model, protocol, variant and query mode, column by column (Avg.: ratio
    of averages). A row whose query mode has no FullKV run falls back to the aware one (FullKV keeps every token
    either way; the table notes it)."""
    out = values.copy()
    for (model, protocol, _), block in values.groupby(level=["model", "protocol", "variant"], sort=False):
        full = block[[is_fullkv(m) for m in block.index.get_level_values("method")]]
        if full.empty:
            raise KvbenchError(f"relative=True needs a FullKV run of {model}"
                               f"{f' ({protocol})' if protocol else ''}; add its folder or use relative=False")
        modes = block.index.get_level_values("query")
        for mode in dict.fromkeys(modes):
            own = full[full.index.get_level_values("query") == mode]
            aware = full[full.index.get_level_values("query") == "aware"]
            reference = (own if not own.empty else aware if not aware.empty else full).iloc[0]
            rows = block[modes == mode]
            out.loc[rows.index] = rows.div(reference.replace(0.0, np.nan), axis=1) * 100.0
    return out


def _bold_mask(values: pd.DataFrame) -> pd.DataFrame:
    """True for the best compressed method per (model, protocol, query mode, decode, variant, budget) and column;
    ties all bold. Only groups with at least two compressed methods get bold (a lone method is not 'best' of
    anything); FullKV is the reference, never bold.
    """
    bold = pd.DataFrame(False, index=values.index, columns=values.columns)
    compressed = values[[not is_fullkv(m) for m in values.index.get_level_values("method")]]
    for _, block in compressed.groupby(level=_GROUP, sort=False):
        if len(block) < 2:
            continue
        best = block.max(axis=0)
        bold.loc[block.index] = block.eq(best, axis=1) & block.notna()
    return bold


def _paired_p(run_dirs: pd.DataFrame, best, second, tasks: list[str], length=None) -> float | None:
    """p-value of the paired test best vs second on these tasks; None when they cannot be paired."""
    dirs = [tuple(str(run_dirs.loc[key].get(t, "")) for t in tasks) for key in (best, second)]
    stamps = tuple(_mtime(d) for d in dirs[0] + dirs[1])  # a rewritten sample file is read again
    return _cached_p(dirs[0], dirs[1], tuple(tasks), None if length is None else int(length), stamps)


def _mtime(run_dir: str) -> int:
    path = Path(run_dir) / SAMPLE_SCORES_FILE
    return path.stat().st_mtime_ns if run_dir and path.is_file() else 0


@lru_cache(maxsize=4096)
def _cached_p(dirs_a: tuple[str, ...], dirs_b: tuple[str, ...], tasks: tuple[str, ...], length,
              _stamps) -> float | None:
    """Same pair, same tasks: the same p (the absolute and percent tables ask twice)."""
    frames = []
    for dirs in (dirs_a, dirs_b):
        groups = _samples_of(pd.Series(dirs, index=list(tasks)), list(tasks), length)
        if groups is None:
            return None
        frames.append(pd.DataFrame({"task": np.repeat(list(tasks), [len(g) for g in groups]),
                                    "id": np.concatenate([g.index.to_numpy() for g in groups]),
                                    "score": np.concatenate([g.to_numpy() for g in groups]) / 100.0}))
    try:  # only the p-value is used: one bootstrap resample is enough
        return compare_samples(frames[0], frames[1], tasks=list(tasks), n_resamples=1)["average"]["p_value"]
    except KvbenchError:
        return None


def _dagger_mask(values: pd.DataFrame, bold: pd.DataFrame, run_dirs: pd.DataFrame, tasks: list[str],
                 length=None) -> pd.DataFrame:
    """True on bold cells whose method is not significantly better than the second best of its group
    (a tie, p >= ALPHA in the paired test, or no per-sample scores to pair)."""
    dagger = pd.DataFrame(False, index=values.index, columns=values.columns)
    position = [_KEYS.index(g) for g in _GROUP]
    for column in values.columns:
        for key in bold.index[bold[column]]:
            group = [k for k in values.index if all(k[i] == key[i] for i in position)
                     and not is_fullkv(k[-1]) and k != key and pd.notna(values.loc[k, column])]
            if not group:
                continue
            second = max(group, key=lambda k: values.loc[k, column])
            if values.loc[second, column] == values.loc[key, column]:
                dagger.loc[key, column] = True
                continue
            p = _paired_p(run_dirs, key, second, tasks if column == AVG else [column], length)
            dagger.loc[key, column] = p is None or p >= ALPHA
    return dagger


def build_table(df: pd.DataFrame, benchmark: str, part: str = "", relative: bool = False, ci: str | None = None,
                significance: bool = True, length: int | None = None) -> _Table:
    """The table of one benchmark (and part: LongBench's language) from `collect()` rows, ready to render. A
    benchmark scored per context length: the rows at `length`, or (None) each run's mean over its lengths."""
    if ci not in CI_VIEWS:
        raise KvbenchError(f"ci must be one of None, 'pm' (± half-width) or 'range' ([lo, hi]), not {ci!r}")
    data, groups, full_count = _select(df, part, benchmark)
    data = _normalised(data)
    over_lengths = length is None and data["length"].notna().any()
    if length is not None:
        data = data[data["length"] == length]
        if data.empty:
            raise KvbenchError(f"no {benchmark} results at length {length}")
    elif over_lengths:
        data = _over_lengths(data)
    data = _resolve_collisions(data)
    tasks = [t for _, ts in groups for t in ts]
    scores = _wide(data, "score", tasks)
    order = _row_order(scores.index)
    scores = scores.loc[order]
    # Pair and resample only samples that match scores.json (collect checked them): others count as missing.
    run_dirs = _wide(data.assign(run_dir=data["run_dir"].where(data["samples_ok"].fillna(False).astype(bool), "")),
                     "run_dir", tasks).loc[order]
    values = scores.assign(**{AVG: scores.mean(axis=1).where(scores.notna().all(axis=1))})
    avg_low, avg_high = _average_ci(run_dirs, tasks, scores, length)
    low = _wide(data, "ci_low", tasks).loc[order].assign(**{AVG: avg_low})
    high = _wide(data, "ci_high", tasks).loc[order].assign(**{AVG: avg_high})
    decimals = 1 if relative else 2
    if relative:
        values = _relative(values)
        low[:], high[:] = math.nan, math.nan  # a CI of a ratio to FullKV is not the CI of either run
    values, low, high = values.round(decimals), low.round(decimals), high.round(decimals)
    bold = _bold_mask(values)  # decided on the numbers as shown, so displayed ties are all bold
    dagger = _dagger_mask(values, bold, run_dirs, tasks, length) if significance else bold & False
    per_row = data.set_index(_KEYS)
    n = per_row.groupby(level=_KEYS)["n"].apply(_n_label).reindex(order)
    status = per_row.groupby(level=_KEYS)["status"].agg(lambda s: ", ".join(sorted(set(s) - {"complete"})))
    kv_mib = per_row.groupby(level=_KEYS)["kv_bytes_mean"].mean().map(kv_mib_label).reindex(order)
    table = _Table(groups, values, low, high, bold, dagger, n, status.reindex(order), kv_mib, decimals,
                   ci if not relative else None)
    table.run_dirs = per_row.groupby(level=_KEYS)["run_dir"].agg(lambda d: sorted(set(d))).reindex(order)
    table.clamped = per_row.groupby(level=_KEYS).apply(clamp_text).reindex(order)
    table.short = abbreviations(benchmark)
    table.notes = _notes(table, full_count, relative, significance, over_lengths)
    return table


CLAMP_MARK = "‡"  # a budget held at the method's minimum on some samples († is the significance mark)


def clamp_text(rows: pd.DataFrame) -> str:
    """How a row's fraction budget was held at the method's minimum (window + 1 tokens): "33 tokens on 12 of 12
    samples" (its prediction lines' `budget_clamped`, summed over its tasks); "" when never."""
    clamped = int(rows["budget_clamped_n"].fillna(0).sum())
    if not clamped:
        return ""
    held = ", ".join(sorted(set(rows["budget_held"].fillna("").astype(str)) - {""}))
    return f"{held} tokens on {clamped} of {int(rows['budget_lines_n'].fillna(0).sum())} samples"


def clamp_note(rows: list[tuple[str, str]]) -> str:
    """The note under a table whose rows (label, clamp_text) were held at the method's minimum."""
    return (f"{CLAMP_MARK}: the budget asked fewer tokens of a prompt than the method's minimum (its window + 1; "
            f"kvpress-style ratios: its window) and was held there (prediction lines' budget_clamped; KV MiB is what "
            f"was held): "
            + "; ".join(f"{label}: {text}" for label, text in rows) + ".")


def _notes(table: _Table, full_count: int | None, relative: bool, significance: bool,
           over_lengths: bool = False) -> list[str]:
    n_tasks = len(table.columns) - 1
    notes = []
    if over_lengths:
        notes.append("Scores: each run's mean over its context lengths; n: samples over all lengths.")
    if full_count and n_tasks < full_count:
        notes.append(f"{AVG} is the mean over the {n_tasks} task(s) shown, not the papers' {full_count}-task average.")
    if table.rows.drop(columns=AVG).isna().any().any():
        notes.append(f"'-': no score; {AVG} is left empty for rows missing a task.")
    if relative:
        notes.append(f"Percent of FullKV (same model and query mode: agnostic rows against the agnostic FullKV "
                     f"where it was run, else the aware one): score / FullKV score x 100; {AVG} = method average / "
                     f"FullKV average x 100.")
    if table.ci:
        view = "± half-width of" if table.ci == "pm" else "[low, high]:"
        notes.append(f"{view} the 95% percentile bootstrap CI (2000 resamples of the samples of each task; {AVG}: "
                     f"resampled within each task, then averaged); none where a run has no sample_scores.jsonl.")
    if table.bold.any().any():
        text = "Bold: best compressed method of each budget (ties all bold; FullKV is the reference, never bold)."
        if significance:
            text += (f" †: not significantly better than the second best (tie, paired sign-flip permutation test "
                     f"p ≥ {ALPHA}, or no per-sample scores to pair); bold without † is significant at {ALPHA}.")
        notes.append(text)
    clamped = [(_row_name(table, key), text) for key, text in table.clamped.items() if text]
    if clamped:
        notes.append(clamp_note(clamped))
    if (table.status != "").any():
        notes.append("Status: the run did not complete (its scores cover the samples done so far).")
    return notes


def _row_name(table: _Table, key) -> str:
    """A row named in a note: its method and budget, then the settings that tell it apart ("SnapKV 0.03125 (m,
    agnostic, every 16)")."""
    model, protocol, tag, query, decode, variant, budget_key, method = key
    shown = [(model, table.rows.index.get_level_values("model").nunique() > 1), (protocol, table.shows("protocol")),
             (tag, table.shows("tag")), (query, table.shows("query")), (decode_label(decode), bool(decode)),
             (variant, table.shows("variant"))]
    settings = [str(value) for value, show in shown if show and value]
    return f"{method} {budget_key}" + (f" ({', '.join(settings)})" if settings else "")


def kv_mib_label(kv_bytes: float) -> str:
    """Mean KV-cache bytes held per sample as MiB with 3 significant digits; '-' when unknown."""
    return "-" if pd.isna(kv_bytes) else f"{kv_bytes / 2 ** 20:.3g}"


def _cell(value: float, decimals: int) -> str:
    return "-" if pd.isna(value) else f"{value:.{decimals}f}"


_MARKUP = {"markdown": ("**{}**", "†", " ± "), "latex": (r"\textbf{{{}}}", r"$^\dagger$", r" $\pm$ "),
           "csv": ("{}", "", " ± ")}


def _cell_text(table: _Table, key, column: str, fmt: str) -> str:
    """One data cell: value, CI (as chosen), bold and dagger marks in the format's markup."""
    value = table.rows.loc[key, column]
    text = _cell(value, table.decimals)
    low, high = table.low.loc[key, column], table.high.loc[key, column]
    bold_fmt, dagger, pm = _MARKUP[fmt]
    if table.ci and pd.notna(value) and pd.notna(low):
        d = table.decimals
        text += f"{pm}{(high - low) / 2:.{d}f}" if table.ci == "pm" else f" [{low:.{d}f}, {high:.{d}f}]"
    if table.bold.loc[key, column]:
        text = bold_fmt.format(text) + (dagger if table.dagger.loc[key, column] else "")
    return text


def _label_columns(table: _Table) -> list[str]:
    return (["Model"] + (["Protocol"] if table.shows("protocol") else []) + (["Tag"] if table.shows("tag") else [])
            + [label for level, label in _SETTINGS.items() if table.shows(level)]
            + ["Budget", "Method", "KV MiB"] + (["Status"] if (table.status != "").any() else []) + ["n"])


def _labels(table: _Table, sparse: bool, marks: bool = True) -> list[list[str]]:
    """Per row, the label cells; with `sparse`, model/protocol and budget only where a group starts (papers' layout),
    and the budget of a row held at the method's minimum marked (`marks`) and shown on that row."""
    names = _label_columns(table)
    out, previous = [], None
    for key in table.rows.index:
        model, protocol, tag, query, decode, variant, budget_key, method = key
        mark = CLAMP_MARK if marks and table.clamped is not None and table.clamped[key] else ""
        full = {"Model": model, "Protocol": protocol, "Tag": tag, "Query": query,
                "Decode": decode_label(decode), "Variant": variant, "Budget": budget_key + mark, "Method": method,
                "KV MiB": table.kv_mib[key], "Status": table.status[key], "n": table.n[key]}
        if sparse and previous is not None:
            if (model, protocol) == previous[:2]:
                full["Model"] = full["Protocol"] = ""
                if key[3:7] == previous[3:7] and not mark:
                    full["Budget"] = ""
        out.append([full[name] for name in names])
        previous = key
    return out


def _header(table: _Table) -> tuple[list[str], list[str]]:
    """(category row, abbreviation row) over all columns, labels included."""
    n_labels = len(_label_columns(table))
    category_row = [""] * n_labels
    for category, tasks in table.groups:
        category_row += [category] + [""] * (len(tasks) - 1)
    return category_row + [""], _label_columns(table) + [table.short.get(t, t) for t in table.columns[:-1]] + [AVG]


def _body(table: _Table, fmt: str, sparse: bool) -> list[list[str]]:
    return [labels + [_cell_text(table, key, column, fmt) for column in table.columns]
            for labels, key in zip(_labels(table, sparse), table.rows.index)]


def _note_lines(table: _Table) -> list[str]:
    return [f"Note: {note}" for note in table.notes]


def _markdown(table: _Table) -> str:
    """Two header lines (categories, then task abbreviations) in the papers' layout, via pandas/tabulate."""
    category_row, abbrev_row = _header(table)
    n_labels = len(_label_columns(table))
    frame = pd.DataFrame([abbrev_row] + _body(table, "markdown", sparse=True))
    text = frame.to_markdown(index=False, headers=category_row, disable_numparse=True,
                             colalign=["left"] * n_labels + ["right"] * len(table.columns))
    return text + ("\n\n" + "\n".join(_note_lines(table)) if table.notes else "") + "\n"


def _latex(table: _Table) -> str:
    """booktabs tabular via pandas' Styler (jinja2): category spans over the task columns, a rule per budget."""
    category_row, abbrev_row = _header(table)
    n_labels = len(_label_columns(table))
    columns = pd.MultiIndex.from_arrays([category_row, abbrev_row])
    frame = pd.DataFrame(_body(table, "latex", sparse=True), columns=columns)
    styler = (frame.style.hide(axis="index").format_index(escape="latex", axis=1)
              .format(escape="latex", subset=list(columns[:n_labels])))
    lines = styler.to_latex(hrules=True, multicol_align="c",
                            column_format="l" * n_labels + "r" * len(table.columns)).splitlines()
    body_start = lines.index(r"\midrule") + 1
    keys = list(table.rows.index)  # a rule where the model, protocol or budget group changes
    group_starts = [i for i in range(1, len(keys)) if keys[i][:2] != keys[i - 1][:2] or keys[i][3:7] != keys[i - 1][3:7]]
    for offset, i in enumerate(group_starts):  # a rule between budgets (and models), as in the papers
        lines.insert(body_start + i + offset, r"\midrule")
    notes = [r"{\footnotesize " + _latex_text(note) + r"}\par" for note in _note_lines(table)]
    lines = [line.replace(CLAMP_MARK, r"$^\ddagger$") for line in lines]
    return "\n".join([r"% LongBench table (kvbench); needs \usepackage{booktabs}"] + lines + notes) + "\n"


_LATEX_TEXT = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
               "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}",
               "†": r"$^\dagger$", CLAMP_MARK: r"$^\ddagger$", "±": r"$\pm$", "≥": r"$\geq$", ">": r"$>$", "<": r"$<$"}


def _latex_text(text: str) -> str:
    """A note as LaTeX text (special characters escaped, † and ± as math symbols)."""
    return "".join(_LATEX_TEXT.get(ch, ch) for ch in text)


def _html(table: _Table) -> str:
    """A <table class="sortable">: category and task header rows, every label filled (rows sort on their own),
    each value cell carrying its number in `data-v` (the sort key) and its CI; notes in a <p> under it."""
    category_row, abbrev_row = _header(table)
    n_labels = len(_label_columns(table))
    spans = "".join(f'<th colspan="{len(tasks)}">{html.escape(cat)}</th>' for cat, tasks in table.groups)
    head = (f'<tr class="groups"><th colspan="{n_labels}"></th>{spans}<th></th></tr>'
            "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in abbrev_row) + "</tr>")
    body = []
    for labels, key in zip(_labels(table, sparse=False), table.rows.index):
        cells = []
        for name, text in zip(_label_columns(table), labels):
            order = budget_order(text.rstrip(CLAMP_MARK)) if name == "Budget" else None  # Full, budgets, ratios
            sort = order[0] * 1e9 + order[1] if order else text
            cells.append(f'<td data-v="{html.escape(str(sort))}">{html.escape(str(text))}</td>')
        for column in table.columns:
            value = table.rows.loc[key, column]
            text = html.escape(_cell_text(table, key, column, "csv"))
            if table.bold.loc[key, column]:
                text = f"<b>{text}</b>{'†' if table.dagger.loc[key, column] else ''}"
            cells.append(f'<td class="num" data-v="{"" if pd.isna(value) else value}">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    notes = "".join(f"<p class=\"note\">{html.escape(n)}</p>" for n in _note_lines(table))
    return (f'<table class="sortable"><thead>{head}</thead><tbody>\n' + "\n".join(body)
            + f"\n</tbody></table>{notes}\n")


def _csv(table: _Table) -> str:
    """Flat CSV: label columns, one column per task (plain numbers) and, with a CI view, <task> lo / <task> hi."""
    frame = pd.DataFrame(_labels(table, sparse=False, marks=False), columns=[c.lower() for c in _label_columns(table)])
    if table.clamped is not None and (table.clamped != "").any():  # the budget held at the method's minimum
        frame.insert(list(frame.columns).index("budget") + 1, "budget clamped", table.clamped.to_numpy())
    for column in table.columns:
        name = table.short.get(column, column)
        frame[name] = table.rows[column].to_numpy()
        if table.ci:
            frame[f"{name} lo"] = table.low[column].to_numpy()
            frame[f"{name} hi"] = table.high[column].to_numpy()
    if not table.shows("tag") and "tag" in frame:
        frame = frame.drop(columns="tag")
    return frame.to_csv(index=False, float_format=f"%.{table.decimals}f", lineterminator="\n")


def render(table: _Table, fmt: str) -> str:
    """A built table as Markdown, LaTeX, CSV or an HTML <table>."""
    if fmt not in FORMATS:
        raise KvbenchError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return {"markdown": _markdown, "latex": _latex, "csv": _csv, "html": _html}[fmt](table)


def benchmark_table(df: pd.DataFrame, benchmark: str, part: str = "", fmt: str = "markdown", relative: bool = False,
                    ci: str | None = None, significance: bool = True, length: int | None = None) -> str:
    """Any benchmark's table (see `build_table`), rendered (see `render`)."""
    if fmt not in FORMATS:
        raise KvbenchError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return render(build_table(df, benchmark, part, relative, ci, significance, length), fmt)


def longbench_table(df: pd.DataFrame, language: str = "en", fmt: str = "markdown", relative: bool = False,
                    benchmark: str | None = None, ci: str | None = None, significance: bool = True) -> str:
    """A LongBench table in the papers' layout from `collect()` output.

    language: "en" (the 16 English tasks) or "zh" (the 5 Chinese tasks); only tasks present get columns.
    fmt: "markdown", "latex" (booktabs) or "csv". relative=True shows percent of FullKV (1 decimal, no CI).
    benchmark: longbench or longbench_e (its `<task>_e` names map onto the same columns); None: the benchmark of
    the rows whose table has this language part, the one with the papers' figures first (LongBench).
    ci: None, "pm" (score ± CI half-width) or "range" (score [low, high]); CSV gets `<task> lo`/`<task> hi` columns.
    significance: mark bold cells whose method is not significantly better than the second best with a dagger.
    Every table has an n column (samples per task) and, when a run did not complete, a Status column.
    """
    if benchmark is None:
        def papers_first(name: str) -> tuple:
            try:
                return (not get(name).papers_figures, name)
            except KvbenchError:
                return (True, name)
        named = sorted((name for name in set(df["benchmark"]) if language in _layout(df, name)), key=papers_first)
        if not named:
            raise KvbenchError(f"no benchmark of these results has a {language!r} table part (LongBench's languages: "
                               f"'en' or 'zh')")
        benchmark = named[0]
    return benchmark_table(df, benchmark, language, fmt, relative, ci, significance)


class NoGroupScores(KvbenchError):
    """No run of the benchmark has per-sample scores with the group table's field."""


def group_table(df: pd.DataFrame, benchmark: str, part: str = "", fmt: str = "markdown", ci: str | None = "pm") -> str:
    """A benchmark's table of scores by a per-sample field (`Benchmark.group_table`; LongBench-E: by input length):
    per run, the mean over its tasks of each group's score (LongBench-E: the 0-4k, 4-8k, 8k+ buckets), with the
    group's 95% CI (resampled within each task's group, then averaged) and n (samples in the group). Reads the runs'
    sample_scores.jsonl; runs without it are listed as missing in the note."""
    if fmt not in FORMATS[:3]:
        raise KvbenchError(f"fmt must be one of {', '.join(FORMATS[:3])}, not {fmt!r}")
    if ci not in CI_VIEWS:
        raise KvbenchError(f"ci must be one of None, 'pm' or 'range', not {ci!r}")
    try:
        spec = get(benchmark).group_table
    except KvbenchError:
        spec = None
    if not spec:
        raise KvbenchError(f"benchmark {benchmark!r} declares no group table (Benchmark.group_table)")
    field, unit, columns = spec["field"], spec["unit"], spec["groups"]  # LongBench-E: bucket, 0-4k 4-8k 8k+
    data, groups, _ = _select(df, part, benchmark)
    tasks = {t for _, ts in groups for t in ts}
    rows, missing = [], []
    for run_dir, run in _normalised(data).groupby("run_dir", sort=False):
        first = run.iloc[0]
        samples = run_samples(run_dir) if run["samples_ok"].fillna(False).astype(bool).all() else None
        if samples is None or field not in samples:
            missing.append(run_dir)
            continue
        samples = samples.assign(task=samples["task"].map(lambda t: _base_task(t, tasks)))
        samples = samples[samples["task"].isin(tasks & set(run["task"]))]
        row = {"Model": first["model"], "Protocol": first["protocol"], "Tag": first["tag"],
               **{label: _setting_text(level, first[level]) for level, label in _SETTINGS.items()},
               "Budget": first["budget_key"], "Method": first["method"],
               "KV MiB": kv_mib_label(run["kv_bytes_mean"].mean()),
               "Status": "" if first["status"] == "complete" else first["status"],
               "Tasks": str(samples["task"].nunique()), "_order": (first["model"], first["protocol"],
                                                                   *(first[level] for level in _SETTINGS),
                                                                   budget_order(first["budget_key"]),
                                                                   method_sort_key(first["method"]), first["tag"])}
        for group in columns:
            block = samples[samples[field] == group]
            groups_b = [g["score"].to_numpy() * 100 for _, g in block.groupby("task")]
            if not groups_b:
                row[group], row[f"{group} lo"], row[f"{group} hi"], row[f"n {group}"] = math.nan, math.nan, \
                    math.nan, 0
                continue
            result = confidence_intervals(groups_b)
            row[group] = result["average"]
            row[f"{group} lo"], row[f"{group} hi"] = result["average_ci"]
            row[f"n {group}"] = len(block)
        rows.append(row)
    if not rows:
        raise NoGroupScores(f"no {benchmark} run has per-sample scores with their {field}; write them with "
                            f"`python -m kvbench.sample_scores RUN_DIR` ({len(missing)} run(s) without)")
    frame = pd.DataFrame(rows)
    frame = frame.iloc[sorted(range(len(frame)), key=lambda i: frame["_order"].iloc[i])].drop(columns="_order")
    labels = (["Model"] + (["Protocol"] if frame["Protocol"].nunique() > 1 else [])
              + (["Tag"] if (frame["Tag"] != "").any() else [])
              + [label for label in _SETTINGS.values() if label == "Decode" or frame[label].nunique() > 1 or
                 (frame[label] != ("aware" if label == "Query" else "")).any()] + ["Budget", "Method", "KV MiB"]
              + (["Status"] if (frame["Status"] != "").any() else []) + ["Tasks"])
    if fmt == "csv":
        keep = labels + [c for b in columns for c in (b, f"{b} lo", f"{b} hi", f"n {b}")
                         if ci or not c.endswith((" lo", " hi"))]
        return frame[keep].to_csv(index=False, float_format="%.2f", lineterminator="\n")
    pm = _MARKUP[fmt][2]
    out = frame[labels].copy()
    for group in columns:
        def show(r, b=group):
            if pd.isna(r[b]):
                return "-"
            if not ci or pd.isna(r[f"{b} lo"]):
                return f"{r[b]:.2f}"
            if ci == "pm":
                return f"{r[b]:.2f}{pm}{(r[f'{b} hi'] - r[f'{b} lo']) / 2:.2f}"
            return f"{r[b]:.2f} [{r[f'{b} lo']:.2f}, {r[f'{b} hi']:.2f}]"
        out[group] = frame.apply(show, axis=1)
        out[f"n {group}"] = frame[f"n {group}"].astype(int).astype(str)
    notes = [spec["note"].format(part=_LANGUAGES.get(part, ""))]
    if ci:
        notes.append(f"± half-width of / [low, high]: the 95% percentile bootstrap CI, resampled within each task's "
                     f"{unit}, then averaged." if ci == "pm" else
                     f"[low, high]: the 95% percentile bootstrap CI, resampled within each task's {unit}, then averaged.")
    if missing:
        notes.append(f"Left out (no sample_scores.jsonl with {unit}s): {', '.join(missing)}.")
    if fmt == "markdown":
        text = out.to_markdown(index=False, disable_numparse=True,
                               colalign=["left"] * len(labels) + ["right"] * (2 * len(columns)))
        return text + "\n\n" + "\n".join(f"Note: {n}" for n in notes) + "\n"
    styler = out.style.hide(axis="index").format(escape="latex", subset=labels).format_index(escape="latex", axis=1)
    text = styler.to_latex(hrules=True, column_format="l" * len(labels) + "r" * (2 * len(columns)))
    return text.replace(" ± ", r" $\pm$ ")


# ----------------------------------------------------------------------------------------------- paper vs ours

def load_paper_results() -> dict:
    """The published DynamicKV numbers shipped in `kvbench/data/paper_results.json`."""
    text = resources.files("kvbench").joinpath("data/paper_results.json").read_text(encoding="utf-8")
    return json.loads(text)


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def paper_model_name(model: str, hub_id: str = "", paper: dict | None = None) -> str | None:
    """The paper's name of a model (matching its name or hub id against the stored aliases), else None."""
    paper = paper or load_paper_results()
    candidates = {_normalise(model), _normalise(str(hub_id).split("/")[-1]), _normalise(hub_id)} - {""}
    for name, info in paper["models"].items():
        aliases = {_normalise(a) for a in info["aliases"] + [name, info["hub_id"], info["hub_id"].split("/")[-1]]}
        if candidates & aliases:
            return name
    return None


def _average_matches(df: pd.DataFrame, paper: dict, published: dict) -> list[dict]:
    """Our averages over the papers' task list of a benchmark's table part (LongBench: the 16 English tasks) for
    runs at the published setting (a paper model, its budget or FullKV)."""
    tasks = get(published["benchmark"]).table_layout[published["part"]][1]
    data = _papers_protocol(df[df["benchmark"] == published["benchmark"]])
    rows = []
    for run_dir, run in data.groupby("run_dir", sort=True):
        first = run.iloc[0]
        name = paper_model_name(first["model"], first.get("hub_id", ""), paper)
        at_budget = first["method"] == "FullKV" or first["budget"] == published["budget"]
        paper_score = published["scores"].get(name, {}).get(first["method"]) if name else None
        if paper_score is None or not at_budget:
            continue
        done = run[run["task"].isin(tasks)].dropna(subset=["score"])
        ours = float(done["score"].mean()) if len(done) == len(tasks) else math.nan
        usable = len(done) == len(tasks) and done.get("samples_ok", pd.Series(False)).fillna(False).astype(bool).all()
        groups = _samples_of(pd.Series(run_dir, index=list(done["task"])), list(done["task"])) if usable else None
        low, high = confidence_intervals([g.to_numpy() for g in groups])["average_ci"] if groups else (math.nan,) * 2
        rows.append({"Model": name, "Method": first["method"], "Paper": paper_score, "Ours": ours,
                     "Tasks": f"{len(done)}/{len(tasks)}", "Protocol": first.get("protocol", ""),
                     "95% CI": _ci_text(low, high), "n": _n_sum(done["n"]),
                     "Status": _status_text(first.get("status", "complete"))})
    return rows


def _papers_protocol(df: pd.DataFrame) -> pd.DataFrame:
    """The rows run as the papers ran them: query-aware, no decode schedule, the plain benchmark."""
    keep = pd.Series(True, index=df.index)
    for column, value in (("query", "aware"), ("decode_interval", 0), ("variant", "")):
        if column in df:
            keep &= df[column].fillna(value) == value
    return df[keep]


def _ci_text(low: float, high: float) -> str:
    return "-" if pd.isna(low) or pd.isna(high) else f"[{low:.2f}, {high:.2f}]"


def _n_sum(counts: pd.Series) -> str:
    return "?" if counts.isna().any() or counts.empty else str(int(counts.sum()))


def _status_text(status) -> str:
    return "" if status == "complete" or pd.isna(status) else str(status)


def _run_matches(df: pd.DataFrame, paper: dict, published: dict) -> list[dict]:
    """Our scores of a one-score-per-run benchmark (the needle's) at its published settings (same model; same
    budget where the paper states one)."""
    rows = []
    for _, run in _papers_protocol(df[df["benchmark"] == published["benchmark"]]).iterrows():
        name = paper_model_name(run["model"], run.get("hub_id", ""), paper)
        for entry in published["settings"]:
            budget_ok = entry["budget"] is None or run["method"] == "FullKV" or run["budget"] == entry["budget"]
            if name == entry["model"] and budget_ok and run["method"] in entry["scores"]:
                rows.append({"Model": name, "Method": run["method"], "Budget": budget_label(run["budget"]),
                             "Paper": entry["scores"][run["method"]], "Ours": float(run["score"]),
                             "Paper setting": f"{entry['contexts']} context, budget "
                                              f"{entry['budget'] if entry['budget'] else 'not stated'}",
                             "95% CI": _ci_text(run.get("ci_low"), run.get("ci_high")),
                             "n": _n_sum(pd.Series([run["n"]])), "Status": _status_text(run.get("status"))})
    return rows


def markdown_frame(frame: pd.DataFrame) -> str:
    """A small frame as a Markdown table (numbers with 2 decimals, '-' for missing); an all-empty Status column
    is left out."""
    if "Status" in frame and (frame["Status"] == "").all():
        frame = frame.drop(columns="Status")
    texts = [i for i, column in enumerate(frame.columns) if not pd.api.types.is_numeric_dtype(frame[column])]  # as given
    frame = frame.astype(object).where(frame.notna(), None)  # tabulate writes missingval only for None
    return frame.to_markdown(index=False, floatfmt=".2f", missingval="-", disable_numparse=texts)


def _texts(published: dict, paper: dict) -> dict:
    """A comparison's fields for its title and reproduce texts: its own, the first setting's, and the models."""
    return {**published, **(published.get("settings") or [{}])[0], "models": ", ".join(paper["models"])}


def _how_to_reproduce(paper: dict) -> str:
    settings = "; ".join(c["reproduce"].format(**_texts(c, paper)) for c in paper["comparisons"])
    return f"No run matches a published setting, so there is nothing to compare. Settings that reproduce: {settings}.\n"


_MATCHES = {"average": (_average_matches, 4), "runs": (_run_matches, 5)}  # kind -> (rows, column of Diff)


def paper_comparison(df: pd.DataFrame) -> str:
    """Markdown: published vs our numbers for runs at the paper's settings, with the difference (ours - paper).

    The comparisons are data (`paper_results.json`, `comparisons`): LongBench's 16-task English average at budget
    512 for the paper's 4 models ("-" until all 16 tasks ran); the needle's README table (Mistral, budget 64) and
    heatmap figures (budget not stated there). If nothing matches, a short note naming the settings that do.
    """
    paper = load_paper_results()
    sections = []
    for published in paper["comparisons"]:
        matches, diff_at = _MATCHES[published["kind"]]
        frame = pd.DataFrame(matches(df, paper, published))
        if not frame.empty:
            frame.insert(diff_at, "Diff", frame["Ours"] - frame["Paper"])
            sections.append(published["title"].format(**_texts(published, paper)) + "\n\n" + markdown_frame(frame)
                            + "\n")
    if not sections:
        return _how_to_reproduce(paper)
    return "\n".join(sections) + ("\nOurs: the runs made as the papers ran them: query-aware, the plain benchmark, "
                                  "Decode prefill (compressed after the prefill only).\n")
