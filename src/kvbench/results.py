"""The result folder of one run: predictions (JSONL, resumable), scores.json and run.json.

Nothing is lost and nothing is mixed:
- every prediction line is appended with one write and fsync'ed; a line cut short by a crash (the last line,
  without its newline) is dropped with a warning on the next start, so the run resumes at that sample;
- a corrupt line elsewhere is an error naming the file and line;
- the folder records a fingerprint of every setting that changes predictions; a rerun with other settings into
  the same folder is refused, a rerun with the same settings skips the samples already done;
- run.json and scores.json are replaced atomically.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable

from kvbench.atomic import write_json_atomic
from kvbench.errors import KvbenchError

RUN_FILE = "run.json"
SCORES_FILE = "scores.json"
PREDICTIONS = "predictions"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(settings: dict) -> str:
    """Stable hash of the settings that change predictions."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_predictions(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Records of a prediction file. A last line without its newline is the trace of an interrupted write:
    with `repair` it is cut off the file (and a warning says so), otherwise it is an error like any corrupt line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            is_torn_tail = number == len(lines) and not raw.endswith(b"\n")
            if repair and is_torn_tail:
                with open(path, "r+b") as handle:
                    handle.truncate(len(raw) - len(line))
                warnings.warn(f"{path}: dropped an incomplete last line (an interrupted write); it will be redone")
                break
            raise KvbenchError(f"{path}, line {number}: not valid JSON ({err.msg}). Remove or fix that line "
                               f"(the run resumes from the samples that remain).") from err
    return records


class RunStore:
    """One run's folder. `open()` checks the fingerprint and returns the ids already done per task."""

    def __init__(self, root: str | os.PathLike, settings: dict, record: dict) -> None:
        self.root = Path(root)
        self.settings = settings
        self.fingerprint = fingerprint(settings)
        self.record = {**record, "fingerprint": self.fingerprint, "settings": settings}

    @property
    def predictions_dir(self) -> Path:
        return self.root / PREDICTIONS

    def prediction_file(self, task: str) -> Path:
        return self.predictions_dir / f"{task}.jsonl"

    def open(self) -> None:
        """Create the folder or check that it holds a run with the same settings."""
        run_file = self.root / RUN_FILE
        if run_file.exists():
            try:
                previous = json.loads(run_file.read_text())
            except json.JSONDecodeError as err:
                raise KvbenchError(f"{run_file} is corrupt ({err.msg}); delete the folder {self.root} to start "
                                   f"over") from err
            if previous.get("fingerprint") != self.fingerprint:
                changed = _changed_keys(previous.get("settings", {}), self.settings)
                raise KvbenchError(
                    f"{self.root} holds results of different settings (changed: {', '.join(changed) or 'unknown'}); "
                    f"refusing to mix them. Choose another folder (output_dir=...) or delete {self.root}."
                )
            self.record["started_first"] = previous.get("started_first", previous.get("started"))
        self.predictions_dir.mkdir(parents=True, exist_ok=True)
        self.record["started"] = now_iso()
        self.record.setdefault("started_first", self.record["started"])
        self.record["status"] = "running"
        write_json_atomic(run_file, self.record)

    def done(self, task: str, key: str = "_id") -> set:
        return {rec.get(key) for rec in read_predictions(self.prediction_file(task), repair=True)}

    def append(self, task: str, record: dict) -> None:
        """Append one prediction as a single write, flushed to disk before returning."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.prediction_file(task), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self, task: str) -> list[dict]:
        return read_predictions(self.prediction_file(task))

    def finish(self, scores: dict, **extra: Any) -> None:
        write_json_atomic(self.root / SCORES_FILE, scores)
        self.record.update(extra, status="complete", ended=now_iso())
        write_json_atomic(self.root / RUN_FILE, self.record)

    def tasks_done(self) -> Iterable[str]:
        return sorted(p.stem for p in self.predictions_dir.glob("*.jsonl"))


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed
