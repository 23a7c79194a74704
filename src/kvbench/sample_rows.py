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
`python -m kvbench.sample_scores RUN_DIR...` writes the file for runs made before it existed (from predictions); it
lives apart from this format because it calls the benchmarks' scorers, which use this format.
"""
from __future__ import annotations

import json
import math
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
           "pop_and_write"]


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
