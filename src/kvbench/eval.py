"""Score a folder of LongBench prediction files: `python -m kvbench.eval DIR [--e]`.

Drop-in for the official `eval.py`: scores every `*.jsonl` in DIR (or DIR/predictions), one
`{"pred", "answers", "all_classes", "length"}` object per line (extra keys allowed), writes the official
`result.json` ({task: score}, LongBench-E: {task: {bucket: score}}) next to the files, and prints a table.
A file whose name is not a LongBench task is an error, not skipped: a silently missing task would change the
averages without anyone noticing.
"""
from __future__ import annotations

import argparse
import math
import sys

from kvbench.atomic import write_json_atomic
from kvbench.errors import KvbenchError
from kvbench.longbench.scoring import BUCKETS, prediction_files, score_folder

__all__ = ["main", "format_table"]


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.2f}"


def _summary_rows(summary: dict) -> list[tuple[str, float | None]]:
    """Averages worth printing: only the ones that exist for the tasks present."""
    rows = [(f"[{name}]", value) for name, value in summary["categories"].items()]
    rows += [(f"[zh {name}]", value) for name, value in summary["categories_zh"].items()]
    for key, label in (("avg_en16", "Avg (16 English tasks)"), ("avg_categories_en", "Avg (EN categories)"),
                       ("avg_categories_zh", "Avg (ZH categories)"), ("avg", "Avg (tasks present)")):
        if summary[key] is not None:
            rows.append((label, summary[key]))
    return rows


def format_table(summary: dict) -> str:
    """Plain-text table of a `score_folder` result: one row per task, then the averages."""
    is_e = summary["benchmark"] == "longbench_e"
    header = ["task", "n", "score"] + (list(BUCKETS) if is_e else [])
    rows = []
    for task, score in summary["tasks"].items():
        row = [task, str(summary["n"][task]), _cell(score)]
        if is_e:
            row += [_cell(summary["longbench_e"][task][bucket]) for bucket in BUCKETS]
        rows.append(row)
    rows += [[label, "", _cell(value)] + [""] * (len(header) - 3) for label, value in _summary_rows(summary)]
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in [header] + rows]
    lines = [line.rstrip() for line in lines]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m kvbench.eval",
        description="Score LongBench prediction files (*.jsonl) with the official metrics and write result.json.",
    )
    parser.add_argument("dir", help="folder with <task>.jsonl prediction files (or a run folder with predictions/)")
    parser.add_argument("--e", action="store_true",
                        help="score as LongBench-E (per length bucket); *_e.jsonl files are LongBench-E anyway")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 on success and 2 on a user error (message on stderr)."""
    args = _parse_args(argv)
    try:
        summary = score_folder(args.dir, e=args.e)
        out_path = prediction_files(args.dir)[0].parent / "result.json"
        write_json_atomic(out_path, summary["result"], indent=4)
    except KvbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a read-only results folder
        print(f"error: cannot read or write in {args.dir}: {error}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
