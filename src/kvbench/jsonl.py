"""Reading JSON-lines files (predictions, per-sample scores, generated, LongBench and kvpress-format data): one
reader, one error format, `<path>, line <n>: not valid JSON (<why>); <fix>`, so that every file kvbench reads fails
the same way.

Lines end at LF only (CRLF is fine: the CR is whitespace to JSON). Python's `str.splitlines` would also split at
U+2028, U+0085 and other characters that JSON allows unescaped inside a string (`json.dumps(ensure_ascii=False)`
writes them raw), so a valid file would read as broken lines."""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from kvbench.errors import KvbenchError


def numbered_jsonl(path: str | os.PathLike, fix: str, repair: bool = False,
                   bom: bool = False) -> Iterator[tuple[int, object]]:
    """(line number, value) of each non-blank line of `path`, read as it goes (stop early to read a prefix).

    The text is UTF-8; with `bom`, a byte-order mark at the start of the file is skipped. A bad line is a
    KvbenchError naming the file and line and ending with `fix` (what the user should do). A last line without its newline is the trace of an interrupted write:
    with `repair` it is cut off the file (a warning says so) and the iteration ends before it."""
    path = Path(path)
    with open(path, "rb") as handle:
        offset = 0
        for number, raw in enumerate(handle, start=1):
            start, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8-sig" if bom and number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise KvbenchError(f"{path}: not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} "
                                   f"at offset {start + error.start}, line {number}); {fix}") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                if repair and not raw.endswith(b"\n"):
                    handle.close()
                    with open(path, "r+b") as writable:
                        writable.truncate(start)
                    warnings.warn(f"{path}: dropped an incomplete last line (an interrupted write); it will be "
                                  "redone")
                    return
                raise KvbenchError(f"{path}, line {number}: not valid JSON ({error.msg}); {fix}") from None
            yield number, value


def read_jsonl(path: str | os.PathLike, fix: str, repair: bool = False, bom: bool = False) -> list:
    """The values of the non-blank lines of `path` (see `numbered_jsonl`)."""
    return [value for _, value in numbered_jsonl(path, fix, repair=repair, bom=bom)]
