"""Per-sample scores of a run: `sample_scores.jsonl`, written beside `scores.json`, so reports never rescore.

Format: one JSON object per line, one line per scored sample::

    {"task": "qasper", "id": "5c1a...", "score": 0.4167}
    {"task": "qasper_e", "id": "...", "score": 1.0, "length": 5310, "bucket": "4-8k"}
    {"task": "needle", "id": "4000_50", "score": 0.909}

- `task`: the task name as in `scores.json` (`needle` for the needle grid, RULER task names for RULER);
- `id`: the sample's stable id, the same in every run of that task (LongBench `_id`, needle cell
  `<length>_<depth>`, RULER sample id); two runs are compared sample by sample on these ids;
- `score`: the per-sample metric (0..1 for LongBench, needle and RULER) whose mean (x 100) is the task score in `scores.json`;
- any other key (`length`, `bucket`, a RULER `context_length`, ...) is kept as is for grouped views.

Who writes it: a benchmark's scorer puts the rows under the key `sample_scores` (`SAMPLES_KEY`) of the scores dict
it returns; the pipeline pops that key before writing `scores.json` and calls `write_sample_scores`.
`python -m kvbench.sample_scores RUN_DIR...` writes the file for runs made before it existed (from predictions).
"""
from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Iterable

import pandas as pd

from kvbench.atomic import atomic_write
from kvbench.errors import KvbenchError
from kvbench.jsonl import read_jsonl

SAMPLE_SCORES_FILE = "sample_scores.jsonl"
SAMPLES_KEY = "sample_scores"
COLUMNS = ("task", "id", "score")

__all__ = ["SAMPLE_SCORES_FILE", "SAMPLES_KEY", "sample_row", "write_sample_scores", "read_sample_scores",
           "pop_and_write", "backfill"]


def sample_row(task: str, sample_id, score: float, **extra) -> dict:
    """One line of `sample_scores.jsonl`; `extra` keys (e.g. length, bucket) are kept as given."""
    return {"task": str(task), "id": str(sample_id), "score": float(score), **extra}


def _check_rows(rows: list[dict], where: str, duplicates_ok: bool = False) -> None:
    """Every row has task, id and a numeric score; a duplicated (task, id) is an error (a warning if duplicates_ok)."""
    seen: set[tuple[str, str]] = set()
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or any(key not in row for key in COLUMNS):
            raise KvbenchError(f"{where}: sample line {number} needs the keys {list(COLUMNS)}, got {row!r:.80}")
        score = row["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
            raise KvbenchError(f"{where}: sample line {number} has a score that is not a number ({score!r})")
        key = (str(row["task"]), str(row["id"]))
        if key in seen and duplicates_ok:
            warnings.warn(f"{where}: sample {key[1]!r} of task {key[0]!r} appears twice; paired comparisons of "
                          f"this run will refuse it until the duplicate prediction is removed", stacklevel=3)
        elif key in seen:
            raise KvbenchError(f"{where}: sample {key[1]!r} of task {key[0]!r} appears twice; rescore the run "
                               f"(python -m kvbench.sample_scores RUN_DIR)")
        seen.add(key)


def write_sample_scores(run_dir: str | Path, rows: Iterable[dict] | None) -> Path | None:
    """Write `<run_dir>/sample_scores.jsonl` atomically (None or no rows: nothing is written)."""
    if rows is None:
        return None
    rows = list(rows)
    if not rows:
        return None
    path = Path(run_dir) / SAMPLE_SCORES_FILE
    _check_rows(rows, str(path), duplicates_ok=True)  # never fail a finished run at its last step
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return atomic_write(path, text)


def pop_and_write(run_dir: str | Path, scores: dict) -> dict:
    """The pipeline's hook: move `scores[SAMPLES_KEY]` (if any) into `sample_scores.jsonl`; returns `scores`."""
    write_sample_scores(run_dir, scores.pop(SAMPLES_KEY, None))
    return scores


def read_sample_scores(run_dir: str | Path) -> pd.DataFrame:
    """The per-sample scores of one run as a DataFrame (columns task, id, score, then any extras).

    A missing file is a KvbenchError naming the fix; so is a corrupt line or a duplicated (task, id).
    """
    path = Path(run_dir) / SAMPLE_SCORES_FILE
    if not path.is_file():
        raise KvbenchError(f"{path} is missing; write it from the predictions with "
                           f"`python -m kvbench.sample_scores {run_dir}`")
    rows = read_jsonl(path, f"rewrite it with `python -m kvbench.sample_scores {run_dir}`")
    _check_rows(rows, str(path))
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    frame["task"] = frame["task"].astype(str)
    frame["id"] = frame["id"].astype(str)
    frame["score"] = frame["score"].astype(float)
    return frame


def backfill(run_dir: str | Path) -> Path:
    """Write `sample_scores.jsonl` of a finished run from its predictions (runs made before the file existed)."""
    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KvbenchError(f"{run_dir / 'run.json'} is missing or corrupt ({exc}); pass a run folder") from None
    benchmark = str(run.get("benchmark", ""))
    if benchmark == "needle":
        from kvbench.needle.scoring import needle_sample_scores
        from kvbench.results import read_predictions
        rows = needle_sample_scores(read_predictions(run_dir / "predictions" / "needle.jsonl"))
    elif benchmark in ("longbench", "longbench_e"):
        from kvbench.longbench.scoring import score_folder
        rows = score_folder(run_dir / "predictions", e=benchmark == "longbench_e")[SAMPLES_KEY]
    else:
        raise KvbenchError(f"{run_dir}: cannot rebuild per-sample scores of benchmark {benchmark!r} here; "
                           f"rerun the same command (finished samples are kept) to write {SAMPLE_SCORES_FILE}")
    rows = _recorded_selection(run_dir, run, rows)
    written = write_sample_scores(run_dir, rows)
    if written is None:
        raise KvbenchError(f"{run_dir} has no predictions to score")
    return written


def _recorded_selection(run_dir: Path, run: dict, rows: list[dict]) -> list[dict]:
    """The rows of the selection `scores.json` covers (the predictions may hold more: a larger earlier command). A
    needle grid is selected by its cells; LongBench tasks by name, and each task's rows must then be the samples
    scores.json counts (its `n` and score), else a KvbenchError: `limit` picks samples by the dataset's order,
    which the predictions alone do not tell."""
    path = run_dir / "scores.json"
    if not path.is_file():  # no scores to agree with (a run that never finished)
        return rows
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KvbenchError(f"{path} is corrupt ({exc}); rerun the run's command to rewrite it") from None
    selection = run.get("selection") or {}
    if run.get("benchmark") == "needle":
        if selection.get("lengths") and selection.get("depths"):
            cells = {f"{length}_{depth}" for length in selection["lengths"] for depth in selection["depths"]}
            rows = [r for r in rows if r["id"] in cells]
        counts, means = {"needle": scores.get("n")}, {"needle": _percent(scores.get("mean_score"))}
    else:
        tasks = scores.get("tasks") or {}
        rows = [r for r in rows if r["task"] in tasks]
        counts, means = scores.get("n") or {}, tasks
    for task, n in counts.items():
        values = [r["score"] for r in rows if r["task"] == task]
        mean = means.get(task)
        if n is not None and (len(values) != n or (mean is not None and values
                                                   and abs(100 * sum(values) / len(values) - mean) > 0.006)):
            command = run.get("command") or "the run's command"
            raise KvbenchError(f"{run_dir}: the predictions hold {len(values)} scored samples of {task}, but "
                               f"scores.json covers {n} (the selection {json.dumps(selection)}); rerun `{command}` "
                               f"(finished samples are kept) to rewrite both")
    return rows


def _percent(value) -> float | None:
    return None if value is None else 100 * float(value)


def main(argv: list[str] | None = None) -> int:
    """`python -m kvbench.sample_scores RUN_DIR...`: write each run's sample_scores.jsonl from its predictions."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m kvbench.sample_scores RUN_DIR...  (writes RUN_DIR/sample_scores.jsonl)")
        return 0 if args else 2
    try:
        for run_dir in args:
            print(f"wrote {backfill(run_dir)}")
    except KvbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
