"""`python -m kvbench.sample_scores RUN_DIR...`: write `sample_scores.jsonl` (format: `kvbench.sample_rows`) of runs
made before the file existed, from their predictions, with each benchmark's scorer."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from kvbench.errors import KvbenchError
from kvbench.longbench.scoring import score_folder
from kvbench.needle.scoring import needle_sample_scores
from kvbench.results import read_predictions
from kvbench.sample_rows import SAMPLE_SCORES_FILE, SAMPLES_KEY, write_sample_scores


def backfill(run_dir: str | Path) -> Path:
    """Write `sample_scores.jsonl` of a finished run from its predictions (runs made before the file existed)."""
    run_dir = Path(run_dir)
    try:
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KvbenchError(f"{run_dir / 'run.json'} is missing or corrupt ({exc}); pass a run folder") from None
    benchmark = str(run.get("benchmark", ""))
    if benchmark == "needle":
        rows = needle_sample_scores(read_predictions(run_dir / "predictions" / "needle.jsonl"))
    elif benchmark in ("longbench", "longbench_e"):
        rows = score_folder(run_dir / "predictions", e=benchmark == "longbench_e")[SAMPLES_KEY]
    else:
        raise KvbenchError(f"{run_dir}: cannot rebuild per-sample scores of benchmark {benchmark!r} here; "
                           f"rerun the same command (finished samples are kept) to write {SAMPLE_SCORES_FILE}")
    written = write_sample_scores(run_dir, rows)
    if written is None:
        raise KvbenchError(f"{run_dir} has no predictions to score")
    return written


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
