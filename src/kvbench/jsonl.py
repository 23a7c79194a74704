"""Reading JSON-lines files (predictions, per-sample scores, generated and kvpress-format data): one reader, one
error format, `<path>, line <n>: not valid JSON (<why>); <fix>`, so that every file kvbench reads fails the same way."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from kvbench.errors import KvbenchError


def read_jsonl(path: str | os.PathLike, fix: str, repair: bool = False, encoding: str = "utf-8") -> list:
    """The values of the non-blank lines of `path` (CRLF is fine; `encoding="utf-8-sig"` also takes a BOM).

    A bad line is a KvbenchError naming the file and line and ending with `fix` (what the user should do). A last
    line without its newline is the trace of an interrupted write: with `repair` it is cut off the file (a warning
    says so) and the records before it are returned."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as error:
        raise KvbenchError(f"{path}: not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} at offset "
                           f"{error.start}); {fix}") from None
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if repair and number == len(lines) and not raw.endswith(b"\n"):
                torn = line.encode(encoding)
                with open(path, "r+b") as handle:
                    handle.truncate(len(raw) - len(torn))
                warnings.warn(f"{path}: dropped an incomplete last line (an interrupted write); it will be redone")
                break
            raise KvbenchError(f"{path}, line {number}: not valid JSON ({error.msg}); {fix}") from None
    return records
