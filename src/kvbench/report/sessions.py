"""Session and cost reports: the score per turn of multi-turn sessions (table + curve), and every run's score
against what it cost, the mean generated length and the mean peak KV bytes (table + figure). Every row and line
says when the method compressed: `prefill` (after the prefill only) or `every N` (method.decode_interval).

`python -m kvbench.report` calls `write_session_report` and `write_cost_report`.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from kvbench.atomic import atomic_write
from kvbench.labels import decode_label, display_method, method_sort_key
from kvbench.report.collect import budget_clamps, budget_label, budget_order
from kvbench.report.tables import CLAMP_MARK, clamp_note, clamp_text
from kvbench.results import read_predictions
from kvbench.stats import bootstrap_ci

_MIB = 2 ** 20


def _decode_order(label: str) -> int:
    return 0 if label == "prefill" else int(label.split()[1])


def _session_runs(paths) -> list[tuple[Path, dict]]:
    runs = []
    for root in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        files = [root / "run.json"] if (root / "run.json").exists() else sorted(root.rglob("run.json"))
        for run_file in files:
            try:
                run = json.loads(run_file.read_text())
            except (json.JSONDecodeError, OSError) as err:
                print(f"(skipped {run_file.parent}: {err})", file=sys.stderr)
                continue
            if ((run.get("settings") or {}).get("benchmark") or {}).get("session"):
                runs.append((run_file.parent, run))
    return runs


def session_frame(paths) -> pd.DataFrame:
    """One row per (session run, turn): score and retrieval (x100) with 95% bootstrap CIs over the sessions, n,
    mean generated tokens and mean peak KV MiB of that turn."""
    rows = []
    for folder, run in _session_runs(paths):
        method = run.get("method") or {}
        bench = (run.get("settings") or {}).get("benchmark") or {}
        full = bool(((run.get("config") or {}).get("method") or {}).get("budget_agnostic"))
        records = [r for path in sorted((folder / "predictions").glob("*.jsonl")) for r in read_predictions(path)
                   if "turn" in r]
        clamped = clamp_text(pd.DataFrame([budget_clamps(records)]))  # turns held at the method's minimum
        for turn, part in pd.DataFrame(records).groupby("turn") if records else []:
            row = {"model": (run.get("model") or {}).get("name", "?"), "benchmark": run.get("benchmark", "?"),
                   "method": display_method(method.get("name", "?")),
                   "budget": "Full" if full else budget_label(method.get("budget"), method.get("compression_ratio")),
                   "answers": bench.get("session_answers", "gold"), "decode": decode_label(method.get("decode_interval")),
                   "turn": int(turn), "n": len(part), "run_dir": str(folder), "clamped": clamped}
            for key in ("score", "retrieval"):
                if key in part:
                    values = part[key].astype(float).to_numpy()
                    low, high = bootstrap_ci(values)
                    row.update({key: 100 * values.mean(), f"{key}_ci_low": 100 * low, f"{key}_ci_high": 100 * high})
            row["new_tokens"] = part["new_tokens"].mean() if "new_tokens" in part else math.nan
            row["peak_kv_mib"] = part["peak_kv_bytes"].mean() / _MIB if "peak_kv_bytes" in part else math.nan
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    order = sorted(frame.index, key=lambda i: (frame.at[i, "model"], frame.at[i, "benchmark"], frame.at[i, "answers"],
                                               _decode_order(frame.at[i, "decode"]), budget_order(frame.at[i, "budget"]),
                                               method_sort_key(frame.at[i, "method"]), frame.at[i, "turn"]))
    return frame.loc[order].reset_index(drop=True)


def _cell(value, low, high) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.1f} [{low:.1f}, {high:.1f}]" if low == low else f"{value:.1f}"


def session_markdown(frame: pd.DataFrame, key: str = "score") -> str:
    """One row per run, one column per turn: the score (x100) with its 95% CI."""
    turns = sorted(frame["turn"].unique())
    head = ["Model", "Benchmark", "Method", "Budget", "Answers", "Decode", *[f"Turn {t}" for t in turns], "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, run in frame.groupby("run_dir", sort=False):
        first = run.iloc[0]
        by_turn = {r.turn: r for r in run.itertuples()}
        cells = [_cell(getattr(by_turn[t], key), getattr(by_turn[t], f"{key}_ci_low"),
                       getattr(by_turn[t], f"{key}_ci_high")) if t in by_turn else "-" for t in turns]
        mark = CLAMP_MARK if getattr(first, "clamped", "") else ""
        lines.append(f"| {first.model} | {first.benchmark} | {first.method} | {first.budget}{mark} | "
                     f"{first.answers} | {first.decode} | " + " | ".join(cells) + f" | {first.n} |")
    return "\n".join(lines) + "\n"


def session_curve(frame: pd.DataFrame, out: Path, key: str = "score") -> list[Path]:
    """Score against turn, one line per run (method, budget, answer mode, decode setting), CI bands."""
    from kvbench.report.figures import _save, _style

    models = sorted(frame["model"].unique())
    fig = Figure(figsize=(6.0 * len(models), 4.2), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False).ravel()
    for ax, model in zip(axes, models):
        for _, run in frame[frame["model"] == model].groupby("run_dir", sort=False):
            first = run.iloc[0]
            label = f"{first.method} {first.budget} ({first.answers} answers, {first.decode})"
            ax.plot(run["turn"], run[key], label=label, linestyle="--" if first.answers == "model" else "-",
                    **_style(first.method))
            if run[f"{key}_ci_low"].notna().any():
                ax.fill_between(run["turn"], run[f"{key}_ci_low"], run[f"{key}_ci_high"],
                                color=_style(first.method)["color"], alpha=0.12)
        ax.set_xticks(sorted(frame["turn"].unique()))
        ax.set_title(f"{model}: multi-turn sessions", fontsize=12)
        ax.set_xlabel("turn", fontsize=10)
        ax.set_ylabel(f"{key} (x100)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out)


def write_session_report(paths, out: Path) -> list[Path]:
    frame = session_frame(paths)
    if frame.empty:
        return []
    text = session_markdown(frame)
    held = [(f"{r.method} {r.budget} ({r.model}, {r.benchmark}, {r.answers} answers)", r.clamped)
            for r in frame.drop_duplicates("run_dir").itertuples() if r.clamped]
    text += f"\n{clamp_note(held)}\n" if held else ""
    if "retrieval" in frame and frame["retrieval"].notna().any():
        text += "\nRetrieval (needle: share of turns whose answer names the needle's key facts):\n\n"
        text += session_markdown(frame, "retrieval")
    text += ("\nTurn t: the t-th question of one conversation over the shared context, every earlier question and "
             "answer in the cache (Answers gold: the reference answers; model: the model's own); the cache is cut "
             "back to the budget at every turn boundary. 95% bootstrap CIs over the sessions.\n")
    print(f"## Multi-turn sessions: score per turn (x100)\n\n{text}")
    written = [atomic_write(Path(out) / "sessions.md", text),
               atomic_write(Path(out) / "sessions.csv", frame.to_csv(index=False))]
    return written + session_curve(frame, Path(out) / "session_turns")


# ---- score against cost: generated length and peak KV bytes ------------------------------------------------------
def cost_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Per run (from `collect`'s rows): the mean task score, mean generated tokens and mean peak KV MiB."""
    data = df.dropna(subset=["score"])
    if data.empty or "peak_kv_bytes_mean" not in data:
        return pd.DataFrame()
    keys = ["model", "benchmark", "method", "budget", "query", "variant", "decode_interval", "run_dir"]
    ratios = data["compression_ratio"] if "compression_ratio" in data else pd.Series(math.nan, index=data.index)
    data = data.assign(budget=[budget_label(b, r) for b, r in zip(data["budget"], ratios)])  # the Budget cell
    frame = data.groupby(keys, dropna=False).agg(score=("score", "mean"), tasks=("score", "size"),
                                                 new_tokens=("new_tokens_mean", "mean"),
                                                 peak_kv_bytes=("peak_kv_bytes_mean", "mean")).reset_index()
    frame["decode"] = frame["decode_interval"].map(decode_label)
    clamped = {run: clamp_text(rows) for run, rows in data.groupby("run_dir")} if "budget_clamped_n" in data else {}
    frame["clamped"] = frame["run_dir"].map(lambda run: clamped.get(run, ""))  # held at the method's minimum
    frame["peak_kv_mib"] = frame["peak_kv_bytes"] / _MIB
    frame = frame.dropna(subset=["new_tokens", "peak_kv_mib"], how="all")
    order = sorted(frame.index, key=lambda i: (frame.at[i, "model"], frame.at[i, "benchmark"], frame.at[i, "query"],
                                               str(frame.at[i, "variant"]), _decode_order(frame.at[i, "decode"]),
                                               budget_order(frame.at[i, "budget"]), method_sort_key(frame.at[i, "method"])))
    return frame.loc[order].reset_index(drop=True)


def cost_markdown(frame: pd.DataFrame) -> str:
    lines = ["| Model | Benchmark | Variant | Query | Method | Budget | Decode | Score | Generated tokens | "
             "Peak KV MiB | Tasks |", "|" + "---|" * 11]
    fmt = lambda v, spec: "-" if v != v else format(v, spec)  # noqa: E731
    for r in frame.itertuples():
        lines.append(f"| {r.model} | {r.benchmark} | {r.variant or '-'} | {r.query} | {r.method} | "
                     f"{r.budget}{CLAMP_MARK if getattr(r, 'clamped', '') else ''} | {r.decode} | "
                     f"{r.score:.2f} | "
                     f"{fmt(r.new_tokens, '.1f')} | {fmt(r.peak_kv_mib, '.3g')} | {r.tasks} |")
    return "\n".join(lines) + "\n"


def cost_figure(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Per model and benchmark: score against mean generated tokens (left) and mean peak KV MiB (right), one point
    per run, labelled with its budget; prefill-only runs filled, decoding-time runs hollow."""
    from kvbench.report.figures import _save, _style

    panels = sorted(frame[["model", "benchmark"]].drop_duplicates().itertuples(index=False))
    fig = Figure(figsize=(11.0, 3.8 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (model, benchmark), (left, right) in zip(panels, axes):
        block = frame[(frame["model"] == model) & (frame["benchmark"] == benchmark)]
        for ax, column, xlabel in ((left, "new_tokens", "mean generated tokens per sample"),
                                   (right, "peak_kv_mib", "mean peak KV cache per sample (MiB)")):
            seen = set()
            for r in block.itertuples():
                x = getattr(r, column)
                if x != x:  # not recorded (runs older than the peak / length fields)
                    continue
                style = _style(r.method)
                settings = [r.query if r.query != "aware" else "", r.variant if r.variant == r.variant else "", r.decode]
                label = f"{r.method} ({', '.join(v for v in settings if v)})"
                ax.plot(x, r.score, linestyle="none", marker=style["marker"], color=style["color"],
                        markerfacecolor=style["color"] if r.decode == "prefill" else "none",
                        label=None if label in seen else label)
                seen.add(label)
                ax.annotate(r.budget, (x, r.score),
                            textcoords="offset points", xytext=(3, 3), fontsize=7)
            ax.set_xlabel(xlabel, fontsize=10)
            ax.set_ylabel("mean task score", fontsize=10)
            ax.set_title(f"{model}, {benchmark}", fontsize=11)
            ax.grid(True, alpha=0.3)
        left.legend(fontsize=7)
    return _save(fig, out)


def write_cost_report(df: pd.DataFrame, out: Path) -> list[Path]:
    frame = cost_frame(df)
    if frame.empty:
        return []
    text = cost_markdown(frame)
    held = [(f"{r.method} {r.budget} ({r.model}, {r.benchmark})", r.clamped) for r in frame.itertuples() if r.clamped]
    text += f"\n{clamp_note(held)}\n" if held else ""
    text += ("\nScore: the mean of the run's task scores; Generated tokens and Peak KV MiB: per-sample means (the "
             "peak is the most KV bytes the cache held at any step). Decode: prefill = compressed after the prefill "
             "only; every N = also every N generated tokens.\n")
    print(f"## Score against generated length and peak KV bytes\n\n{text}")
    return [atomic_write(Path(out) / "cost.md", text), atomic_write(Path(out) / "cost.csv", frame.to_csv(index=False)),
            *cost_figure(frame, Path(out) / "score_vs_cost")]
