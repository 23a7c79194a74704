"""LongBench tables in the KV-compression papers' layout, and the paper-vs-ours comparison.

Layout (PyramidKV / SnapKV / DynamicKV tables): rows grouped by model, then budget (FullKV once, at the top), then
method in the papers' order; columns are the tasks grouped by LongBench category, then the average. The best
compressed method of each budget is bold in every column. Renders as Markdown, LaTeX (booktabs) or CSV.
"""
from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import pandas as pd

from kvbench.errors import KvbenchError
from kvbench.longbench.tasks import CATEGORIES_EN, CATEGORIES_ZH, CHINESE_5, ENGLISH_16
from kvbench.report.collect import method_sort_key

ABBREVIATIONS = {
    "narrativeqa": "NrtvQA", "qasper": "Qasper", "multifieldqa_en": "MF-en", "hotpotqa": "HotpotQA",
    "2wikimqa": "2WikiMQA", "musique": "Musique", "gov_report": "GovReport", "qmsum": "QMSum",
    "multi_news": "MultiNews", "trec": "TREC", "triviaqa": "TriviaQA", "samsum": "SAMSum",
    "passage_count": "PCount", "passage_retrieval_en": "PRe", "lcc": "Lcc", "repobench-p": "RB-P",
    "multifieldqa_zh": "MF-zh", "dureader": "DuReader", "vcsum": "VCSum", "lsht": "LSHT",
    "passage_retrieval_zh": "PR-zh",
}
CATEGORY_LABELS = {"Code Completion": "Code"}  # the papers' short header
AVG = "Avg."
FORMATS = ("markdown", "latex", "csv")
_LANGUAGES = {"en": (ENGLISH_16, CATEGORIES_EN), "zh": (CHINESE_5, CATEGORIES_ZH)}
_KEYS = ["model", "protocol", "budget_key", "method"]


@dataclass
class _Table:
    """A table ready to render: column groups, row labels, values and bold flags."""

    groups: list[tuple[str, list[str]]]          # (category, [task, ...]) in column order
    rows: pd.DataFrame                            # index = _KEYS, columns = tasks + [AVG], display-rounded
    bold: pd.DataFrame                            # same shape, True where the cell is bold
    decimals: int
    show_protocol: bool
    notes: list[str] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        return [task for _, tasks in self.groups for task in tasks] + [AVG]


def _base_task(name: str) -> str:
    """LongBench-E task names (`qasper_e`) share the base task's column."""
    return name[:-2] if name.endswith("_e") and name[:-2] in ABBREVIATIONS else name


def _select(df: pd.DataFrame, language: str, benchmark: str) -> tuple[pd.DataFrame, list[tuple[str, list[str]]]]:
    """The rows of one benchmark and language, and the present tasks grouped by category in paper order."""
    if language not in _LANGUAGES:
        raise KvbenchError(f"language must be 'en' or 'zh', not {language!r}")
    wanted, categories = _LANGUAGES[language]
    missing = {"model", "benchmark", "method", "budget", "task", "score"} - set(df.columns)
    if missing:
        raise KvbenchError(f"the results table lacks columns {sorted(missing)}; build it with kvbench.report.collect()")
    data = df[df["benchmark"] == benchmark].copy()
    data["task"] = data["task"].map(_base_task)
    data = data[data["task"].isin(wanted)]
    if data.empty:
        raise KvbenchError(f"no {'English' if language == 'en' else 'Chinese'} {benchmark} tasks in these results; "
                           f"tasks found: {sorted(df['task'].unique())}")
    present = set(data["task"])
    groups = [(CATEGORY_LABELS.get(cat, cat), [t for t in tasks if t in present and t in wanted])
              for cat, tasks in categories.items()]
    return data, [(cat, tasks) for cat, tasks in groups if tasks]


def _check_unique(data: pd.DataFrame) -> None:
    """Two runs for the same table cell would make the cell ambiguous: name them and stop."""
    dup = data[data.duplicated(_KEYS + ["task"], keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        dirs = sorted(set(dup[(dup[_KEYS + ["task"]] == first[_KEYS + ["task"]]).all(axis=1)].get("run_dir", [])))
        raise KvbenchError(f"several runs give {first['method']} budget {budget_label(first['budget'])} "
                           f"{first['task']} for {first['model']}: {dirs}; pass only one of them to the report")


def budget_label(budget) -> str:
    """'Full' for FullKV (no budget), integers without '.0', others as given."""
    if budget is None or (isinstance(budget, float) and math.isnan(budget)) or budget < 0:
        return "Full"
    return str(int(budget)) if float(budget).is_integer() else f"{budget:g}"


def _ordered_wide(data: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Scores as rows (model, protocol, budget, method) x task columns, in the papers' row order."""
    data = data.assign(budget_key=data["budget"].astype(float).fillna(-1.0),
                       protocol=data["protocol"].fillna("") if "protocol" in data else "")
    _check_unique(data)
    wide = data.set_index(_KEYS + ["task"])["score"].unstack("task").reindex(columns=tasks)
    order = sorted(wide.index, key=lambda k: (k[0], k[1], k[2], method_sort_key(k[3])))
    return wide.loc[order]


def _with_average(wide: pd.DataFrame) -> pd.DataFrame:
    """Append Avg.: mean over the table's tasks, left empty for rows that miss one (never a partial mean)."""
    out = wide.copy()
    out[AVG] = wide.mean(axis=1).where(wide.notna().all(axis=1))
    return out


def _relative(values: pd.DataFrame) -> pd.DataFrame:
    """Percent of the FullKV row of the same model and protocol, column by column (Avg.: ratio of averages)."""
    out = values.copy()
    for (model, protocol), block in values.groupby(level=["model", "protocol"], sort=False):
        full = block[block.index.get_level_values("method") == "FullKV"]
        if full.empty:
            raise KvbenchError(f"relative=True needs a FullKV run of {model}"
                               f"{f' ({protocol})' if protocol else ''}; add its folder or use relative=False")
        reference = full.iloc[0].replace(0.0, np.nan)
        out.loc[block.index] = block.div(reference, axis=1) * 100.0
    return out


def _bold_mask(values: pd.DataFrame) -> pd.DataFrame:
    """True for the best compressed method per (model, protocol, budget) and column; ties all bold.

    Only budgets with at least two compressed methods get bold (a lone method is not 'best' of anything).
    """
    bold = pd.DataFrame(False, index=values.index, columns=values.columns)
    compressed = values[values.index.get_level_values("method") != "FullKV"]
    for _, block in compressed.groupby(level=["model", "protocol", "budget_key"], sort=False):
        if len(block) < 2:
            continue
        best = block.max(axis=0)
        bold.loc[block.index] = block.eq(best, axis=1) & block.notna()
    return bold


def _build(df: pd.DataFrame, language: str, relative: bool, benchmark: str) -> _Table:
    data, groups = _select(df, language, benchmark)
    tasks = [t for _, ts in groups for t in ts]
    values = _with_average(_ordered_wide(data, tasks))
    decimals = 1 if relative else 2
    if relative:
        values = _relative(values)
    values = values.round(decimals)  # bold is decided on the numbers as shown, so displayed ties are all bold
    table = _Table(groups, values, _bold_mask(values), decimals,
                   show_protocol=values.index.get_level_values("protocol").nunique() > 1)
    table.notes = _notes(table, language, relative)
    return table


def _notes(table: _Table, language: str, relative: bool) -> list[str]:
    full_count = 16 if language == "en" else 5
    n_tasks = len(table.columns) - 1
    notes = []
    if n_tasks < full_count:
        notes.append(f"{AVG} is the mean over the {n_tasks} task(s) shown, not the papers' {full_count}-task average.")
    if table.rows.drop(columns=AVG).isna().any().any():
        notes.append(f"'-': no score; {AVG} is left empty for rows missing a task.")
    if relative:
        notes.append(f"Percent of FullKV (same model): score / FullKV score x 100; {AVG} = method average / "
                     f"FullKV average x 100.")
    if table.bold.any().any():
        notes.append("Bold: best compressed method of each budget (ties all bold).")
    return notes


def _cell(value: float, decimals: int) -> str:
    return "-" if pd.isna(value) else f"{value:.{decimals}f}"


def _row_labels(table: _Table) -> list[dict]:
    """Per row: model/budget labels shown only where a group starts (the papers' layout), plus method."""
    labels, previous = [], (None, None, None)
    for model, protocol, budget_key, method in table.rows.index:
        new_model = (model, protocol) != previous[:2]
        new_budget = new_model or budget_key != previous[2]
        labels.append({"model": model if new_model else "", "protocol": protocol if new_model else "",
                       "budget": budget_label(budget_key) if new_budget else "", "method": method,
                       "new_model": new_model, "new_budget": new_budget})
        previous = (model, protocol, budget_key)
    return labels


def _markdown(table: _Table) -> str:
    label_cols = ["Model"] + (["Protocol"] if table.show_protocol else []) + ["Budget", "Method"]
    category_row = [""] * len(label_cols)
    for category, tasks in table.groups:
        category_row += [category] + [""] * (len(tasks) - 1)
    category_row.append("")
    abbrev_row = label_cols + [ABBREVIATIONS[t] for t in table.columns[:-1]] + [AVG]
    body = []
    for labels, (key, values) in zip(_row_labels(table), table.rows.iterrows()):
        left = [labels["model"]] + ([labels["protocol"]] if table.show_protocol else []) + \
               [labels["budget"], labels["method"]]
        cells = [f"**{_cell(v, table.decimals)}**" if table.bold.loc[key, col] else _cell(v, table.decimals)
                 for col, v in values.items()]
        body.append(left + cells)
    grid = [category_row, abbrev_row] + body
    widths = [max(len(row[i]) for row in grid) for i in range(len(abbrev_row))]
    n_left = len(label_cols)

    def line(row):
        return "| " + " | ".join(c.ljust(w) if i < n_left else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i >= n_left else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    lines = [line(category_row), rule, line(abbrev_row)] + [line(r) for r in body]
    return "\n".join(lines + ([""] + [f"Note: {n}" for n in table.notes] if table.notes else [])) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex(table: _Table) -> str:
    n_cols = 2 + len(table.columns)
    header = [r"% LongBench table (kvbench); needs \usepackage{booktabs}",
              r"\begin{tabular}{ll" + "r" * len(table.columns) + "}", r"\toprule"]
    spans, rules, start = [" ", " "], [], 3
    for category, tasks in table.groups:
        spans.append(rf"\multicolumn{{{len(tasks)}}}{{c}}{{{_tex(category)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(tasks) - 1}}}")
        start += len(tasks)
    spans.append(" ")
    header += [" & ".join(spans) + r" \\", " ".join(rules),
               " & ".join(["Budget", "Method"] + [ABBREVIATIONS[t] for t in table.columns[:-1]] + [AVG]) + r" \\"]
    body = []
    for labels, (key, values) in zip(_row_labels(table), table.rows.iterrows()):
        if labels["new_model"]:
            title = labels["model"] + (f" ({labels['protocol']})" if table.show_protocol else "")
            body += [r"\midrule", rf"\multicolumn{{{n_cols}}}{{c}}{{\textit{{{_tex(title)}}}}} \\", r"\midrule"]
        elif labels["new_budget"]:
            body.append(r"\midrule")
        cells = [rf"\textbf{{{_cell(v, table.decimals)}}}" if table.bold.loc[key, col] else _cell(v, table.decimals)
                 for col, v in values.items()]
        body.append(" & ".join([_tex(labels["budget"]), _tex(labels["method"])] + cells) + r" \\")
    footer = [r"\bottomrule"]
    footer += [rf"\multicolumn{{{n_cols}}}{{l}}{{\footnotesize {_tex(n)}}} \\" for n in table.notes]
    return "\n".join(header + body + footer + [r"\end{tabular}"]) + "\n"


def _csv(table: _Table) -> str:
    out = table.rows.reset_index()
    out["budget"] = out["budget_key"].map(budget_label)
    columns = ["model"] + (["protocol"] if table.show_protocol else []) + ["budget", "method"]
    out = out[columns + table.columns].rename(columns={t: ABBREVIATIONS[t] for t in table.columns[:-1]})
    buffer = io.StringIO()
    out.to_csv(buffer, index=False, float_format=f"%.{table.decimals}f", lineterminator="\n")
    return buffer.getvalue()


def longbench_table(df: pd.DataFrame, language: str = "en", fmt: str = "markdown", relative: bool = False,
                    benchmark: str = "longbench") -> str:
    """A LongBench table in the papers' layout from `collect()` output.

    language: "en" (the 16 English tasks) or "zh" (the 5 Chinese tasks); only tasks present get columns.
    fmt: "markdown", "latex" (booktabs) or "csv". relative=True shows percent of FullKV (1 decimal).
    benchmark: "longbench" or "longbench_e" (its `<task>_e` names map onto the same columns).
    """
    if fmt not in FORMATS:
        raise KvbenchError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    table = _build(df, language, relative, benchmark)
    return {"markdown": _markdown, "latex": _latex, "csv": _csv}[fmt](table)


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


def _longbench_matches(df: pd.DataFrame, paper: dict) -> list[dict]:
    """Our 16-task English averages for runs at the paper's LongBench setting (paper model, budget 512 or FullKV)."""
    published = paper["longbench_kv512"]
    data = df[df["benchmark"] == published["benchmark"]]
    rows = []
    for run_dir, run in data.groupby("run_dir", sort=True):
        first = run.iloc[0]
        name = paper_model_name(first["model"], first.get("hub_id", ""), paper)
        at_budget = first["method"] == "FullKV" or first["budget"] == published["budget"]
        paper_score = published["scores"].get(name, {}).get(first["method"]) if name else None
        if paper_score is None or not at_budget:
            continue
        scores = run[run["task"].isin(ENGLISH_16)].set_index("task")["score"].dropna()
        ours = float(scores.mean()) if len(scores) == 16 else math.nan
        rows.append({"Model": name, "Method": first["method"], "Paper": paper_score, "Ours": ours,
                     "Tasks": f"{len(scores)}/16", "Protocol": first.get("protocol", "")})
    return rows


def _needle_matches(df: pd.DataFrame, paper: dict) -> list[dict]:
    """Our needle scores for the paper's needle settings (same model; same budget where the paper states one)."""
    rows = []
    needle = df[df["benchmark"] == "needle"]
    for _, run in needle.iterrows():
        name = paper_model_name(run["model"], run.get("hub_id", ""), paper)
        for entry in paper["needle"]:
            budget_ok = entry["budget"] is None or run["method"] == "FullKV" or run["budget"] == entry["budget"]
            if name == entry["model"] and budget_ok and run["method"] in entry["scores"]:
                rows.append({"Model": name, "Method": run["method"], "Budget": budget_label(run["budget"]),
                             "Paper": entry["scores"][run["method"]], "Ours": float(run["score"]),
                             "Paper setting": f"{entry['contexts']} context, budget "
                                              f"{entry['budget'] if entry['budget'] else 'not stated'}"})
    return rows


def markdown_frame(frame: pd.DataFrame) -> str:
    """A small frame as an aligned Markdown table (numbers with 2 decimals, '-' for missing)."""
    text = frame.map(lambda v: _cell(v, 2) if isinstance(v, float) else str(v))
    widths = {c: max(len(c), *(len(v) for v in text[c])) for c in text.columns}
    head = "| " + " | ".join(c.ljust(widths[c]) for c in text.columns) + " |"
    rule = "|" + "|".join("-" * (widths[c] + 2) for c in text.columns) + "|"
    body = ["| " + " | ".join(row[c].ljust(widths[c]) for c in text.columns) + " |" for _, row in text.iterrows()]
    return "\n".join([head, rule] + body)


def _how_to_reproduce(paper: dict) -> str:
    models = ", ".join(paper["models"])
    needle = paper["needle"][0]
    return ("No run matches a published setting, so there is nothing to compare. Settings that reproduce: "
            f"LongBench, all 16 English tasks, budget {paper['longbench_kv512']['budget']} (plus FullKV) for "
            f"{models}; needle with {needle['model']} at budget {needle['budget']} ({needle['contexts']} "
            "context).\n")


def paper_comparison(df: pd.DataFrame) -> str:
    """Markdown: published vs our numbers for runs at the paper's settings, with the difference (ours - paper).

    LongBench: the 16-task English average at budget 512 for the paper's 4 models ("-" until all 16 tasks ran).
    Needle: the README table (Mistral, budget 64) and the heatmap figures (budget not stated there).
    If nothing matches, a short note naming the settings that do.
    """
    paper = load_paper_results()
    sections = []
    longbench = pd.DataFrame(_longbench_matches(df, paper))
    if not longbench.empty:
        longbench.insert(4, "Diff", longbench["Ours"] - longbench["Paper"])
        sections.append(f"LongBench average over the 16 English tasks, budget {paper['longbench_kv512']['budget']} "
                        f"(paper: DynamicKV README)\n\n" + markdown_frame(longbench) + "\n")
    needle = pd.DataFrame(_needle_matches(df, paper))
    if not needle.empty:
        needle.insert(5, "Diff", needle["Ours"] - needle["Paper"])
        sections.append("Needle-in-a-Haystack, score in percent (paper: DynamicKV README / figures)\n\n"
                        + markdown_frame(needle) + "\n")
    if not sections:
        return _how_to_reproduce(paper)
    return "\n".join(sections)
