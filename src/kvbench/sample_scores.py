"""`python -m kvbench.sample_scores RUN_DIR...`: write `sample_scores.jsonl` (format: `kvbench.sample_rows`) of runs
made before the file existed, from their predictions, with each benchmark's scorer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kvbench.benchmark import of_run
from kvbench.errors import KvbenchError
from kvbench.sample_rows import SAMPLE_SCORES_FILE, write_sample_scores


def backfill(run_dir: str | Path) -> Path:
    """Write `sample_scores.jsonl` of a finished run from its predictions (runs made before the file existed)."""
    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KvbenchError(f"{run_dir / 'run.json'} is missing or corrupt ({exc}); pass a run folder") from None
    try:
        rows = of_run(run).rescore(run_dir)
    except KvbenchError as err:
        raise KvbenchError(f"{run_dir}: {err} to write {SAMPLE_SCORES_FILE}") from None
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
    rows, counts, means = of_run(run).selected_rows(rows, scores, selection)
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
