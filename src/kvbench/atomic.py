"""Atomic file writes: readers (and a crash) never see half a file."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError


class WriteError(KvbenchError, OSError):
    """A file that could not be written (a full disk, a read-only or unwritable folder): one line naming the file
    and the fix. Still an OSError, for the callers to whom a failed write is only a warning."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(err: OSError, path: str | os.PathLike) -> WriteError:
    """The one-line error of a failed write of `path`."""
    if isinstance(err, WriteError):
        return err
    fix = ("free some space, then rerun the same command (a run resumes where it stopped)"
           if err.errno == errno.ENOSPC else "choose a writable folder")
    error = WriteError(err.errno, f"cannot write {path} ({err.strerror or err}); {fix}")
    error.filename = str(path)
    return error


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to a temporary file in the same folder, flush it to disk, then rename it over `path`. A failure
    (full disk, unwritable folder) is a `WriteError` and leaves `path` as it was."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_error(err, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are as readable as any new file
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(err, path) from None
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    return atomic_write(path, json.dumps(data, ensure_ascii=False, indent=indent, default=str) + "\n")
