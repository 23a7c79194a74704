"""Gather finished runs into pandas DataFrames.

A *run folder* is what the pipeline writes: `run.json`, `scores.json` and `predictions/<task>.jsonl`.
`collect` accepts run folders or any folder above them (it walks for `run.json`).

Error policy: a path that does not exist, or a set of paths with no run in it, is a `KvbenchError`.
A run whose `run.json`/`scores.json` is missing or corrupt (typically a run still in progress or killed)
is **skipped with a `ReportWarning` naming the file**, so one broken run does not block a report of fifty.
Pass `strict=True` to turn those warnings into `KvbenchError`s. A missing or corrupt predictions file keeps the
run's scores but leaves its bytes/timing columns empty (NaN), again with a warning. Confidence intervals come from
the run's `sample_scores.jsonl` (never from rescoring); a run without it gets NaN intervals.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from functools import lru_cache
from typing import Iterable

import numpy as np
import pandas as pd

from kvbench.benchmark import Benchmark, of_run
from kvbench.errors import KvbenchError
from kvbench.jsonl import read_jsonl
from kvbench.labels import display_method
from kvbench.sample_rows import SAMPLE_SCORES_FILE, read_sample_scores
from kvbench.stats import bootstrap_ci

RESULT_COLUMNS = [
    "model", "hub_id", "benchmark", "method", "budget", "task", "score", "ci_low", "ci_high", "samples_ok", "n",
    "protocol", "tag",
    "status", "kv_bytes_mean", "prefill_s_mean", "decode_s_mean", "run_dir", "query", "compression_ratio", "settings",
    "decode_interval", "peak_kv_bytes_mean", "new_tokens_mean",
]
# Needle runs: the retrieval score (percent of cells naming the needle's key facts) and its CI; NaN for others.
RESULT_COLUMNS += ["retrieval", "retrieval_ci_low", "retrieval_ci_high"]
# Settings that tell rows apart, as fields (never parsed back out of labels): the context length of a benchmark that
# scores per length (RULER; <NA> otherwise) and the benchmark variant ("multi-needle", "session"; "" for the plain
# benchmark); the decode schedule is `decode_interval` (0: compression at prefill only).
RESULT_COLUMNS += ["length", "variant"]
# Samples whose fraction budget resolved below the method's minimum (window + 1) and was held there (prediction lines'
# `budget_clamped`), of the task's prediction lines, and the tokens held ("33", or "33-40"; "" when none).
RESULT_COLUMNS += ["budget_clamped_n", "budget_lines_n", "budget_held"]
VARIANT_KEYS = {"multi_needle": "multi-needle", "session": "session"}  # benchmark config flag -> variant name
ALLOCATION_COLUMNS = ["model", "benchmark", "method", "query", "decode_interval", "variant", "budget", "task", "layer",
                      "kept_mean"]
_SCORE_TOLERANCE = 0.006  # scores.json rounds task scores to 2 decimals


class ReportWarning(UserWarning):
    """A run was skipped or is incomplete; the message names the file."""


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """All run folders (folders holding `run.json`) at or below the given paths, sorted, without duplicates."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise KvbenchError("no result folders given; pass at least one folder, e.g. results/")
    found: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise KvbenchError(f"result folder {str(root)!r} does not exist; check the path (runs are written "
                               f"under results/<model>/<benchmark>/<run_name>/)")
        if root.is_file():
            root = root.parent if root.name == "run.json" else root
        found.update(p.parent.resolve() for p in root.rglob("run.json"))
        if (root / "run.json").is_file():
            found.add(root.resolve())
    return sorted(found)


def _problem(message: str, strict: bool) -> None:
    """Raise in strict mode, warn otherwise (the documented skip policy)."""
    if strict:
        raise KvbenchError(message)
    warnings.warn(message, ReportWarning, stacklevel=3)


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; a KvbenchError naming the file when it is missing or not valid JSON."""
    if not path.is_file():
        raise KvbenchError(f"{path} is missing; the run did not finish - rerun it or remove its folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KvbenchError(f"{path} is not valid JSON ({exc}); rerun that run or remove its folder") from exc
    if not isinstance(data, dict):
        raise KvbenchError(f"{path} should hold a JSON object; rerun that run or remove its folder")
    return data


def read_predictions(path: Path) -> list[dict]:
    """The records of one predictions `.jsonl` file; a KvbenchError naming file and line when one is corrupt."""
    return read_jsonl(path, "rerun that task (a run resumes from the samples that remain)", bom=True)


def _budget(value) -> float:
    """Budgets as floats; FullKV (None) becomes NaN, which the tables show as 'Full'."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise KvbenchError(f"method budget {value!r} is not a number; fix 'method.budget' in run.json") from None


def budget_label(budget, ratio=None) -> str:
    """The Budget cell: 'Full' for FullKV (no budget), `ratio 0.9` for a run asked with `method.compression_ratio`,
    integers without '.0', fractions as given."""
    if ratio is not None and not (isinstance(ratio, float) and math.isnan(ratio)):
        return f"ratio {float(ratio):g}"
    if budget is None or (isinstance(budget, float) and math.isnan(budget)) or budget < 0:
        return "Full"
    return str(int(budget)) if float(budget).is_integer() else f"{budget:g}"


def budget_order(label: str) -> tuple:
    """Sort key of Budget cells: Full, then token budgets and fractions by size, then ratios by size."""
    if label == "Full":
        return (0, 0.0)
    if label.startswith("ratio "):
        return (2, float(label.split()[1]))
    return (1, float(label))


def _run_identity(run: dict, run_dir: Path) -> dict:
    """The columns shared by every row of one run, read from its run.json."""
    model = run.get("model") or {}
    method = run.get("method") or {}
    if not isinstance(model, dict) or not isinstance(method, dict) or "name" not in method:
        raise KvbenchError(f"{run_dir / 'run.json'} lacks 'model'/'method.name'; rerun that run")
    name = display_method(method["name"])
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    bench = config.get("benchmark") if isinstance(config.get("benchmark"), dict) else {}
    interval = method.get("decode_interval")
    # The query mode and the variant are columns: the protocol name drops the suffixes that repeat them.
    protocol = str(run.get("protocol", "")).replace("_agnostic", "").replace("_multineedle", "")
    return {
        "model": str(model.get("name", run_dir.parts[-3] if len(run_dir.parts) >= 3 else "?")),
        "hub_id": str(model.get("hub_id", "")),
        "benchmark": str(run.get("benchmark", "")),
        "method": name,
        "budget": math.nan if name == "FullKV" else _budget(method.get("budget")),
        "compression_ratio": math.nan if name == "FullKV" else _budget(method.get("compression_ratio")),
        "protocol": protocol,
        "tag": str((run.get("config") or {}).get("tag") or ""),
        "status": str(run.get("status") or "unknown"),
        "run_dir": str(run_dir),
        # a column: no table or figure mixes the two modes (a session compresses its context alone: agnostic)
        "query": "agnostic" if bench.get("session") else str(bench.get("query") or "aware"),
        "decode_interval": int(interval or 0),  # decoding-time runs (every N tokens) get their own rows
        "variant": ", ".join([label for key, label in VARIANT_KEYS.items() if bench.get(key)]
                             + (["model answers"] if bench.get("session") and bench.get("session_answers") == "model"
                                else [])),
        "settings": str(run.get("fingerprint") or ""),  # rows join runs of equal settings only (report.tables)
    }


def _mean_of(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return float(np.mean(values)) if values else math.nan


def _prediction_stats(pred_file: Path, strict: bool) -> dict:
    """Mean kv_bytes / prefill_s / decode_s of one predictions file (NaN with a warning if unreadable)."""
    empty = {"kv_bytes_mean": math.nan, "prefill_s_mean": math.nan, "decode_s_mean": math.nan,
             "peak_kv_bytes_mean": math.nan, "new_tokens_mean": math.nan, "budget_clamped_n": 0, "budget_lines_n": 0,
             "budget_held": ""}
    if not pred_file.is_file():
        _problem(f"{pred_file} is missing; KV bytes and timings of that task are left empty", strict)
        return empty
    try:
        records = read_predictions(pred_file)
    except KvbenchError as exc:
        _problem(f"{exc}; KV bytes and timings of that task are left empty", strict)
        return empty
    return {
        "kv_bytes_mean": _mean_of(records, "kv_bytes"),
        "prefill_s_mean": _mean_of(records, "prefill_s"),
        "decode_s_mean": _mean_of(records, "decode_s"),
        "peak_kv_bytes_mean": _mean_of(records, "peak_kv_bytes"),
        "new_tokens_mean": _mean_of(records, "new_tokens"),
        **budget_clamps(records),
    }


def budget_clamps(records: list[dict]) -> dict:
    """How many lines held their budget at the method's minimum (`budget_clamped`), of how many, at what tokens."""
    held = sorted({int(r["budget_tokens"]) for r in records if r.get("budget_clamped")})
    return {"budget_clamped_n": sum(1 for r in records if r.get("budget_clamped")), "budget_lines_n": len(records),
            "budget_held": "" if not held else str(held[0]) if len(held) == 1 else f"{held[0]}-{held[-1]}"}


def run_samples(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's `sample_scores.jsonl` (task, id, score in 0..1, extras), or None when the run has none."""
    path = Path(run_dir) / SAMPLE_SCORES_FILE
    if not path.is_file():
        return None
    return _cached_samples(str(path.parent), path.stat().st_mtime_ns)


@lru_cache(maxsize=256)
def _cached_samples(run_dir: str, _mtime: int) -> pd.DataFrame:
    return read_sample_scores(run_dir)


def task_samples(run_dir: str, task: str, length=None) -> pd.Series | None:
    """Per-sample scores of one task (at one context length, when given) in score points (0..100), indexed by
    sample id; None when not available."""
    samples = run_samples(run_dir)
    if samples is None:
        return None
    block = samples[samples["task"] == task]
    if length is not None and not pd.isna(length):
        if "context_length" not in block:
            return None
        block = block[block["context_length"] == int(length)]
    return None if block.empty else block.set_index("id")["score"] * 100.0


def _check_samples(run_dir: Path, task: str, score: float, n, strict: bool, length=None) -> pd.Series | None:
    """The task's samples if they match scores.json (count and mean), else None with a warning naming the file."""
    try:
        values = task_samples(str(run_dir), task, length)
    except KvbenchError as exc:
        _problem(f"{exc}; that run's confidence intervals are left out", strict)
        return None
    if values is None:
        return None
    mean = float(values.mean())
    if (n is not None and len(values) != n) or (not math.isnan(score) and abs(mean - score) > _SCORE_TOLERANCE):
        _problem(f"{run_dir / SAMPLE_SCORES_FILE}: task {task}{'' if length is None else f' at length {length}'} has {len(values)} samples averaging {mean:.2f}, but "
                 f"scores.json says n={n}, {score:.2f}; its CI is left out - rewrite the file with "
                 f"`python -m kvbench.sample_scores {run_dir}`", strict)
        return None
    return values


def _with_ci(row: dict, run_dir: Path, strict: bool) -> dict:
    """Add ci_low/ci_high (score points) from the run's per-sample scores; NaN without them."""
    values = _check_samples(run_dir, row["task"], row["score"], row["n"], strict, row.get("length"))
    low, high = bootstrap_ci(values.to_numpy()) if values is not None else (math.nan, math.nan)
    return {**row, "ci_low": low, "ci_high": high, "samples_ok": values is not None}


def _extra_score(run_dir: Path, scores: dict, row: dict, column: str, field: str) -> dict:
    """A benchmark's extra score column (`Benchmark.row_extras`, e.g. the needle's retrieval) in percent, with its
    CI, from the samples' `field` in sample_scores.jsonl (the samples its `score` was checked on); else the
    `mean_<field>` of scores.json without a CI; a run scored before kvbench had it gets NaN and a warning naming the
    command that adds it (from the predictions)."""
    samples = run_samples(run_dir) if row["samples_ok"] else None
    values = None
    if samples is not None and field in samples.columns:
        values = samples.loc[samples["task"] == row["task"], field].to_numpy(dtype=float) * 100.0
    if values is not None and len(values) and not np.isnan(values).any():
        low, high = bootstrap_ci(values)
        return {column: float(values.mean()), f"{column}_ci_low": low, f"{column}_ci_high": high}
    mean = scores.get(f"mean_{field}")
    if mean is None:
        warnings.warn(f"{run_dir}: no {row['task']} {column} score (scored before kvbench had it); add it from the "
                      f"predictions with `python -m kvbench.sample_scores {run_dir}`", ReportWarning, stacklevel=4)
    return {column: math.nan if mean is None else 100.0 * float(mean), f"{column}_ci_low": math.nan,
            f"{column}_ci_high": math.nan}


def _benchmark_of(run: dict) -> type[Benchmark]:
    """The run's benchmark class; one that no longer imports is read the generic way (its `tasks` and `n`)."""
    try:
        return of_run(run)
    except KvbenchError:
        return Benchmark


def _rows_of_run(run_dir: Path, strict: bool) -> list[dict]:
    """One row per task of a run (and per context length when scored per length); the benchmark says which
    (`Benchmark.score_rows`: needle, one row 'needle', score in percent)."""
    run = _read_json(run_dir / "run.json")
    identity = _run_identity(run, run_dir)
    scores = _read_json(run_dir / "scores.json")
    identity["benchmark"] = identity["benchmark"] or str(scores.get("benchmark") or "")
    benchmark = _benchmark_of({**run, "benchmark": identity["benchmark"]})
    try:
        parts = benchmark.score_rows(scores)
    except KvbenchError as exc:
        raise KvbenchError(f"{run_dir / 'scores.json'} {exc}") from None
    rows = []
    for part in parts:
        stats = _prediction_stats(run_dir / "predictions" / f"{part['task']}.jsonl", strict)
        score = math.nan if part["score"] is None else float(part["score"])
        row = _with_ci({**identity, **part, "score": score, **stats}, run_dir, strict)
        for column, field in benchmark.row_extras.items():
            row.update(_extra_score(run_dir, scores, row, column, field))
        rows.append(row)
    return rows


def collect(paths: list[str | Path] | str | Path, strict: bool = False) -> pd.DataFrame:
    """One DataFrame row per (run, task) for every run folder at or below `paths`.

    Columns: model, hub_id, benchmark, method (papers' spelling), budget (NaN for FullKV), task, score (0..100;
    needle runs: task "needle", score = 100 * mean_score), ci_low/ci_high (95% percentile bootstrap CI of the score
    from the run's sample_scores.jsonl; NaN without it), samples_ok (the task's per-sample scores exist and match
    scores.json, so CIs and paired tests may use them), n, protocol, tag (run.json config.tag, "" if none), status
    (run.json status: "complete", "running", "interrupted", "unknown"), kv_bytes_mean, prefill_s_mean,
    decode_s_mean, run_dir, query ("aware"/"agnostic"), length (context length of a benchmark scored per length,
    e.g. RULER: one row per length and task; <NA> otherwise), decode_interval (0: none), variant
    ("multi-needle", "session" or ""); needle runs also retrieval (percent of cells whose answer names the needle's key
    facts: what measures retrieval) with retrieval_ci_low/high (NaN for other runs); budget_clamped_n / budget_lines_n /
    budget_held: the task's prediction lines whose budget was held at the method's minimum, of all its lines, and the
    tokens held ("33"; "" when none). Broken runs are skipped with a
    `ReportWarning` (or raise with `strict=True`).
    """
    rows: list[dict] = []
    run_dirs = find_run_dirs(paths)
    for run_dir in run_dirs:
        try:
            rows.extend(_rows_of_run(run_dir, strict))
        except KvbenchError as exc:
            _problem(f"skipping run {run_dir}: {exc}", strict)
    if not rows:
        where = ", ".join(str(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths))
        raise KvbenchError(f"no readable runs (folders with run.json and scores.json) under {where}; "
                           f"run the benchmark first, e.g. `python run.py method=snapkv budget=128`")
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    frame["n"] = pd.to_numeric(frame["n"], errors="coerce").astype("Int64")
    frame["length"] = pd.to_numeric(frame["length"], errors="coerce").astype("Int64")
    return frame


def _allocation_rows(run_dir: Path, strict: bool) -> list[dict]:
    """Per-layer mean of `layer_kept` for each predictions file of one run."""
    identity = _run_identity(_read_json(run_dir / "run.json"), run_dir)
    rows = []
    for pred_file in sorted((run_dir / "predictions").glob("*.jsonl")):
        try:
            kept = [r["layer_kept"] for r in read_predictions(pred_file) if isinstance(r.get("layer_kept"), list)]
        except KvbenchError as exc:
            _problem(f"skipping {pred_file}: {exc}", strict)
            continue
        if not kept or len({len(k) for k in kept}) != 1:
            if kept:
                _problem(f"{pred_file}: 'layer_kept' lists have different lengths; skipping that task", strict)
            continue
        means = np.asarray(kept, dtype=float).mean(axis=0)
        rows.extend({"model": identity["model"], "benchmark": identity["benchmark"], "method": identity["method"],
                     "query": identity["query"], "decode_interval": identity["decode_interval"],
                     "variant": identity["variant"], "budget": identity["budget"], "task": pred_file.stem, "layer": layer,
                     "kept_mean": float(value)} for layer, value in enumerate(means))
    return rows


def layer_allocations(paths: list[str | Path] | str | Path, strict: bool = False) -> pd.DataFrame:
    """Mean tokens kept per head in each layer, per (model, method, budget, task), from the predictions' `layer_kept`.

    Columns: model, benchmark, method, query, decode_interval, variant, budget, task, layer (0-based), kept_mean. Runs
    without `layer_kept` give no rows.
    """
    rows: list[dict] = []
    for run_dir in find_run_dirs(paths):
        try:
            rows.extend(_allocation_rows(run_dir, strict))
        except KvbenchError as exc:
            _problem(f"skipping run {run_dir}: {exc}", strict)
    return pd.DataFrame(rows, columns=ALLOCATION_COLUMNS)
