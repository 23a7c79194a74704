"""The result folder of one run: predictions (JSONL, resumable), scores.json and run.json.

Nothing is lost and nothing is mixed:
- one run at a time per folder: a run holds an advisory lock (`fcntl.flock` on `<folder>/.lock`) from the moment it
  opens the folder until it exits; a second run into the same folder fails at once naming the holder. The kernel
  drops the lock when the holder dies (even by kill -9), so a lock is never stale;
- every prediction line is appended with one write and fsync'ed; a line cut short by a crash (the last line,
  without its newline) is dropped with a warning on the next start, so the run resumes at that sample;
- a corrupt line elsewhere is an error naming the file and line; a duplicated id (never written by kvbench, but
  possible in hand-edited or merged files) is counted once, with a warning;
- the folder records a fingerprint of every setting that changes predictions; a rerun with other settings into
  the same folder is refused while the folder holds a prediction (an empty folder, e.g. from a failed start, is
  reused by any settings); a rerun with the same settings skips the samples already done;
- run.json records one entry per session that generated samples; a rerun that has nothing to do leaves it as is;
- run.json and scores.json are replaced atomically.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Iterable

from kvbench.atomic import write_error, write_json_atomic
from kvbench.errors import KvbenchError
from kvbench.jsonl import read_jsonl

RUN_FILE = "run.json"
SCORES_FILE = "scores.json"
PREDICTIONS = "predictions"
LOCK_FILE = ".lock"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fingerprint(settings: dict) -> str:
    """Stable hash of the settings that change predictions."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Model-config keys that moved to the protocol / needle configs, and where they are set now. Validation refuses
# them; runs recorded before the move carry them in `settings.model.extra` and are the same settings without them
# (the method's and the needle's own settings record their values).
MOVED_MODEL_KEYS = {"paper_pooling": "protocol.methods.pooling (or the protocol's per_model table)",
                    "paper_radio_max": "protocol.methods.radio_max (or the protocol's per_model table)",
                    "needle_prompt": "benchmark.prompt (or the needle config's per_model table)"}


def _fingerprints(record: dict) -> set[str]:
    """The fingerprint a run record carries, and that of its settings without the moved model keys."""
    settings = json.loads(json.dumps(record.get("settings", {}), default=str))
    extra = (settings.get("model") or {}).get("extra") or {}
    for key in MOVED_MODEL_KEYS:
        extra.pop(key, None)
    return {record.get("fingerprint"), fingerprint(settings)}


def read_predictions(path: str | os.PathLike, repair: bool = False) -> list[dict]:
    """Records of a prediction file ([] when there is none). A last line without its newline is the trace of an
    interrupted write: with `repair` it is cut off the file (and a warning says so), otherwise it is an error like
    any corrupt line."""
    if not Path(path).exists():
        return []
    # bom: a file opened and saved by an editor that adds a byte-order mark is still the run's own file
    return read_jsonl(path, "remove or fix that line (the run resumes from the samples that remain)", repair=repair,
                      bom=True)


def unique_records(records: list[dict], key: str, where: str | os.PathLike = "") -> list[dict]:
    """The records with each `key` value once (the first one kept); a warning counts the duplicates dropped."""
    seen, kept = set(), []
    for record in records:
        value = record.get(key)
        if value is not None and value in seen:
            continue
        seen.add(value)
        kept.append(record)
    if len(kept) < len(records):
        warnings.warn(f"{where}: {len(records) - len(kept)} duplicated {key} line(s) ignored (the first of each "
                      f"is scored)")
    return kept


# ---------------------------------------------------------------------------------------------- the folder lock


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text().strip()
    except OSError:
        text = ""
    return text or "another process"


def folder_locked(root: str | os.PathLike) -> str | None:
    """Who holds a result folder's lock ("pid 123 on host, since ...") while a run is writing it; None when free.
    The sweep planner uses it to skip folders that a live job holds."""
    lock_path = Path(root) / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return _holder(lock_path)
        return None
    finally:
        os.close(fd)  # closing also drops the shared lock taken above
    return None


class FolderLock:
    """An exclusive advisory lock on a result folder, held until `release()` or the process ends."""

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise busy_error(self.path.parent, _holder(self.path)) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {now_iso()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def busy_error(root: Path, holder: str) -> KvbenchError:
    return KvbenchError(f"{root} is being written by another run ({holder}); wait for it to finish (then rerun to "
                        f"resume), or choose another folder (output_dir=... or tag=...)")


# ---------------------------------------------------------------------------------------------- the run store


class RunStore:
    """One run's folder.

    `check()` (no side effects) refuses a folder of other settings or one that another run holds, before any model
    loads; `open()` creates the folder, takes the lock and writes the run record; `begin_session()` marks the
    record "running" when the first new sample is about to be written; `finish()`/`interrupted()` close the session;
    `close()` releases the lock (also done by the kernel when the process dies).
    """

    def __init__(self, root: str | os.PathLike, settings: dict, record: dict) -> None:
        self.root = Path(root)
        self.settings = settings
        self.fingerprint = fingerprint(settings)
        self.record = {**record, "fingerprint": self.fingerprint, "settings": settings}
        self.lock = FolderLock(self.root)
        self.session: dict | None = None
        self._previous: dict | None = None

    @property
    def predictions_dir(self) -> Path:
        return self.root / PREDICTIONS

    def prediction_file(self, task: str) -> Path:
        return self.predictions_dir / f"{task}.jsonl"

    def has_predictions(self) -> bool:
        return any(path.stat().st_size > 0 for path in self.predictions_dir.glob("*.jsonl"))

    def _read_previous(self) -> dict | None:
        run_file = self.root / RUN_FILE
        if not run_file.exists():
            return None
        try:
            return json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if not self.has_predictions():
                return None  # a folder without predictions is reused whatever its record says
            raise KvbenchError(f"{run_file} is corrupt ({err}); delete the folder {self.root} to start over") from err

    def check(self) -> None:
        """Refuse, without touching anything, a folder that holds other settings' predictions or a live run."""
        if self.root.exists() and not self.root.is_dir():
            raise KvbenchError(f"the result folder {self.root} is a file; set output_dir= to a folder")
        holder = folder_locked(self.root)
        if holder:
            raise busy_error(self.root, holder)
        self._refuse_other_settings(self._read_previous())
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), None)
        if existing == self.root and not os.access(self.root, os.W_OK):
            raise KvbenchError(f"the result folder {self.root} is not writable (a read-only mount?); its scores stay "
                               f"readable there. To rerun or extend it, copy the folder somewhere writable and set "
                               f"output_dir= to the copy")
        if existing is not None and not os.access(existing, os.W_OK):
            raise KvbenchError(f"cannot create the result folder {self.root}: {existing} is not writable; set "
                               f"results_root= or output_dir= to a writable folder")

    def _refuse_other_settings(self, previous: dict | None) -> None:
        if previous is not None and self.fingerprint not in _fingerprints(previous) and self.has_predictions():
            changed = _changed_keys(previous.get("settings", {}), self.settings)
            raise KvbenchError(
                f"{self.root} holds results of different settings (changed: {', '.join(changed) or 'unknown'}); "
                f"refusing to mix them. Choose another folder (output_dir=... or tag=...) or delete {self.root}."
            )

    def open(self) -> None:
        """Create the folder, take its lock, check it (again, now under the lock) and record the run."""
        try:
            self.predictions_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise KvbenchError(f"cannot create the result folder {self.root}: {err.strerror}; set output_dir= or "
                               f"results_root= to a writable folder") from None
        self.lock.acquire()
        try:
            self.check_locked()
        except BaseException:
            self.lock.release()
            raise

    def check_locked(self) -> None:
        previous = self._read_previous()
        self._refuse_other_settings(previous)  # a run of other settings may have written it since check()
        if previous is not None and self.fingerprint in _fingerprints(previous):
            self._previous = previous
            return
        # A new folder, or one holding no prediction (a failed start): this run's record replaces any other.
        self.record.update(status="created", created=now_iso(), sessions=[])
        write_json_atomic(self.root / RUN_FILE, self.record)

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "RunStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the session record ----------------------------------------------------------------------------------
    def _base_record(self) -> dict:
        """The record to update: the previous one (same settings) with this run's description on top."""
        if self._previous is None:
            return self.record
        merged = {**self._previous, **{k: v for k, v in self.record.items() if k != "sessions"}}
        merged["sessions"] = list(self._previous.get("sessions") or [])
        merged.setdefault("created", self._previous.get("started_first") or self._previous.get("started"))
        return merged

    def begin_session(self, info: dict) -> None:
        """Called before the first sample this process writes: the record says "running" from now on."""
        if self.session is not None:
            return
        self.record = self._base_record()
        self._previous = None
        self.session = {"started": now_iso(), **info}
        self.record["sessions"].append(self.session)
        self.record["status"] = "running"
        write_json_atomic(self.root / RUN_FILE, self.record)

    def end_session(self, status: str, top: dict | None = None, **session_fields: Any) -> bool:
        """Close this session with `status` (`top`: fields of the whole folder, e.g. kv_bytes_mean); returns False,
        writing nothing, when the session wrote no sample and the record already has this status: a rerun with
        nothing to do leaves run.json as it was."""
        if self.session is None:
            if self._previous is None:  # a new folder whose selection needed no generation
                self.record.update(top or {}, status=status)
                write_json_atomic(self.root / RUN_FILE, self.record)
                return True
            if self._previous.get("status") == status:
                return False
            updated = {**self._previous, "status": status}  # e.g. interrupted just after its last sample
            write_json_atomic(self.root / RUN_FILE, updated)
            return True
        self.session.update(session_fields, ended=now_iso(), status=status)
        self.record.update(top or {}, status=status, ended=self.session["ended"], **_totals(self.record["sessions"]))
        write_json_atomic(self.root / RUN_FILE, self.record)
        return True

    # ---- predictions -----------------------------------------------------------------------------------------
    def done(self, task: str, key: str = "_id") -> set:
        return {rec.get(key) for rec in read_predictions(self.prediction_file(task), repair=True)}

    def append(self, task: str, record: dict) -> None:
        """Append one prediction as a single write, flushed to disk before returning."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        path = self.prediction_file(task)
        try:
            _append_line(path, line)
        except OSError as err:  # a full disk: one line; a cut line is dropped when the run resumes
            raise write_error(err, path) from None

    def records(self, task: str, key: str = "_id") -> list[dict]:
        """The task's records, each id once (the first kept, with a warning for duplicates)."""
        path = self.prediction_file(task)
        return unique_records(read_predictions(path), key, path)

    def write_scores(self, scores: dict) -> None:
        write_json_atomic(self.root / SCORES_FILE, scores)

    def tasks_done(self) -> Iterable[str]:
        return sorted(p.stem for p in self.predictions_dir.glob("*.jsonl"))


def _append_line(path: Path, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.write(fd, line) != len(line):  # a short write: the disk filled up during it (the cut line is redone)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
    finally:
        os.close(fd)


CONTEXT_KEYS = ("context_prefills", "context_prefills_avoided", "context_prefill_s_avoided")


def _totals(sessions: list[dict]) -> dict:
    """Timing and memory over every session that generated samples (the cost of the whole folder)."""
    worked = [s for s in sessions if s.get("timing")]
    if not worked:
        return {}
    sums = {key: sum(s["timing"].get(key, 0) for s in worked)
            for key in ("total_s", "samples", "prefill_s", "decode_s", "new_tokens")}
    n = max(sums["samples"], 1)
    timing = {"total_s": round(sums["total_s"], 2), "samples": sums["samples"], "sessions": len(worked),
              "prefill_s_mean": round(sums["prefill_s"] / n, 4),
              "decode_ms_per_token": round(1000 * sums["decode_s"] / max(sums["new_tokens"], 1), 3),
              "s_per_sample": round((sums["prefill_s"] + sums["decode_s"]) / n, 3)}
    for key in CONTEXT_KEYS:  # query-agnostic runs: compress once, ask many (engine.ContextCache.stats)
        if any(key in s["timing"] for s in worked):
            timing[key] = round(sum(s["timing"].get(key, 0) for s in worked), 3)
    totals: dict[str, Any] = {"timing": timing}
    peaks = [s["peak_memory_bytes"] for s in worked if s.get("peak_memory_bytes")]
    if peaks:
        totals["peak_memory_bytes"] = max(peaks)
    return totals


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed
