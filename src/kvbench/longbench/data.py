"""Loading LongBench (v1) task files, verified against the bundled sha256 manifest.

The files are the `<task>.jsonl` files of LongBench's `data.zip` (LongBench-E: `<task>_e.jsonl`), one JSON object
per line, read in file order (the order the KV-compression repos use). Two byte variants circulate, LF- and
CRLF-terminated, with identical JSON content; both are accepted (see `verify_file`).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kvbench.errors import KvbenchError
from kvbench.jsonl import numbered_jsonl
from kvbench.longbench.tasks import task_spec

_MANIFEST_RESOURCE = "data/longbench_manifest.json"
_CHUNK_BYTES = 1 << 20
_OPT_OUT = "benchmark.verify_checksums=false"
_DATA_DIR_HINT = (
    "download LongBench's data.zip (https://huggingface.co/datasets/THUDM/LongBench/resolve/main/data.zip), "
    "unzip it and set benchmark.data_dir=/path/to/data (the folder holding the <task>.jsonl files)"
)

# (resolved path, size, mtime_ns) -> the variant that matched, so repeated loads in one process do not re-hash.
_VERIFIED: dict[tuple[str, int, int], str] = {}


class LongBenchDataError(KvbenchError):
    """A LongBench data file is missing, corrupt or does not match the manifest."""


@dataclass
class DataSource:
    """Where LongBench samples come from.

    path: local folder with `<task>.jsonl` files (the layout of data.zip). When None, `hub_id` is loaded with
        `datasets.load_dataset(hub_id, task, split="test")` (needs network and a `datasets` version that still runs
        loading scripts; checksums are not verified for hub data).
    verify: check line count and sha256 of local files against the manifest.
    limit: keep only the first `limit` samples, in file order (None = all).
    """

    path: str | os.PathLike | None = None
    hub_id: str = "THUDM/LongBench"
    verify: bool = True
    limit: int | None = None

    def __post_init__(self) -> None:
        limit = self.limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise LongBenchDataError(
                f"benchmark.limit must be a positive integer or null (all samples), got {limit!r}"
            )


def task_filename(task: str) -> str:
    """The file name of a task in data.zip: `<task>.jsonl`; validates the task name (`_e` = LongBench-E)."""
    task_spec(task)  # raises a KvbenchError listing the valid names
    return f"{task}.jsonl"


def manifest_path() -> Any:
    """The bundled manifest as an importlib.resources Traversable (a real Path for a normal install)."""
    return resources.files("kvbench").joinpath(_MANIFEST_RESOURCE)


@functools.lru_cache(maxsize=1)
def _cached_manifest() -> dict[str, dict]:
    return json.loads(manifest_path().read_text(encoding="utf-8"))


def load_manifest() -> dict[str, dict]:
    """The manifest: file name -> {lines, sha256_lf, bytes_lf, sha256_crlf, bytes_crlf} (crlf may be null).

    Returns a fresh copy, so callers may modify it freely.
    """
    return copy.deepcopy(_cached_manifest())


@dataclass(frozen=True)
class _Digest:
    lines: int
    sha256: str             # of the bytes as they are
    sha256_lf: str          # of the bytes with every CRLF turned into LF
    has_crlf: bool


def _digest_file(path: Path) -> _Digest:
    """Hash a file in chunks, raw and LF-normalised, and count its lines, in a single pass."""
    raw, normalised = hashlib.sha256(), hashlib.sha256()
    newlines, last_byte, held_cr, has_crlf = 0, b"", b"", False
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            raw.update(chunk)
            newlines += chunk.count(b"\n")
            last_byte = chunk[-1:]
            # A CR at the end of a chunk may pair with an LF at the start of the next one: hold it back.
            text = held_cr + chunk
            held_cr = b"\r" if text.endswith(b"\r") else b""
            text = text[:-1] if held_cr else text
            has_crlf = has_crlf or b"\r\n" in text
            normalised.update(text.replace(b"\r\n", b"\n"))
    normalised.update(held_cr)
    lines = newlines + (1 if last_byte not in (b"", b"\n") else 0)
    return _Digest(lines, raw.hexdigest(), normalised.hexdigest(), has_crlf)


def _match_variant(digest: _Digest, entry: dict) -> str | None:
    """Which manifest variant the file is: "lf", "crlf", "crlf-normalised" or None (no match)."""
    if digest.lines != entry["lines"]:
        return None
    if digest.sha256 == entry["sha256_lf"]:
        return "lf"
    if entry.get("sha256_crlf") and digest.sha256 == entry["sha256_crlf"]:
        return "crlf"
    # A CRLF copy with identical JSON content but no CRLF hash in the manifest: accept it on the LF hash.
    if digest.has_crlf and digest.sha256_lf == entry["sha256_lf"]:
        return "crlf-normalised"
    return None


def _mismatch_message(path: Path, entry: dict, digest: _Digest) -> str:
    expected = f"{entry['lines']} lines, sha256 {entry['sha256_lf']} (LF)"
    if entry.get("sha256_crlf"):
        expected += f" or {entry['sha256_crlf']} (CRLF)"
    return (
        f"LongBench file {path} does not match the manifest: expected {expected}; found {digest.lines} lines, "
        f"sha256 {digest.sha256}. The file is incomplete or modified: re-extract it from LongBench's data.zip, "
        f"or skip this check with {_OPT_OUT}."
    )


def verify_file(path: str | os.PathLike, manifest: dict[str, dict] | None = None) -> str:
    """Check a task file's line count and sha256 against the manifest; returns the variant that matched.

    Accepted: the LF file ("lf"), the CRLF file when the manifest has its hash ("crlf"), and any CRLF copy whose
    LF-normalised bytes match the LF hash ("crlf-normalised": same JSON content). Anything else raises a
    LongBenchDataError naming the file, what was expected, what was found and the opt-out. Successful checks are
    cached per (path, size, mtime) for the life of the process.
    """
    path = Path(path)
    entries = _cached_manifest() if manifest is None else manifest
    if path.name not in entries:
        raise LongBenchDataError(
            f"{path.name} is not a LongBench file listed in the manifest; rename it to <task>.jsonl "
            f"or skip the check with {_OPT_OUT}"
        )
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if manifest is None and key in _VERIFIED:
        return _VERIFIED[key]
    digest = _digest_file(path)
    variant = _match_variant(digest, entries[path.name])
    if variant is None:
        raise LongBenchDataError(_mismatch_message(path, entries[path.name], digest))
    if manifest is None:  # only the bundled manifest's verdicts are cached
        _VERIFIED[key] = variant
    return variant


def _missing_file_message(folder: Path, filename: str) -> str:
    present = sorted(p.name for p in folder.glob("*.jsonl"))
    found = ", ".join(present) if present else "no .jsonl files"
    message = f"LongBench file {folder / filename} not found; the folder has: {found}."
    if (folder / "data" / filename).is_file():
        message += f" data.zip extracts into a 'data' subfolder: set benchmark.data_dir={folder / 'data'}"
    else:
        message += f" To get it, {_DATA_DIR_HINT}"
    return message


def local_task_file(task: str, folder: str | os.PathLike) -> Path:
    """The path of a task's jsonl file in `folder`, with clear errors when the folder or the file is missing."""
    folder = Path(folder).expanduser()
    filename = task_filename(task)
    if not folder.is_dir():
        raise LongBenchDataError(f"LongBench data folder {folder} does not exist; {_DATA_DIR_HINT}")
    path = folder / filename
    if not path.is_file():
        raise LongBenchDataError(_missing_file_message(folder, filename))
    return path


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The samples of a LongBench jsonl file in file order (the first `limit`; the rest is not read)."""
    fix = "re-extract the file from LongBench's data.zip"
    samples: list[dict] = []
    if limit is not None and limit <= 0:
        return samples
    try:
        for line_number, sample in numbered_jsonl(path, fix):
            if not isinstance(sample, dict):
                raise LongBenchDataError(
                    f"{path}, line {line_number}: a JSON {type(sample).__name__}, expected an object with 'input', "
                    f"'context', 'answers', ...; {fix}")
            samples.append(sample)
            if limit is not None and len(samples) >= limit:
                break
    except LongBenchDataError:
        raise
    except KvbenchError as error:
        raise LongBenchDataError(str(error)) from None
    return samples


def _load_from_hub(task: str, hub_id: str, limit: int | None) -> list[dict]:
    """Load a task via `datasets`; any failure (offline, no loading-script support) becomes a clear error."""
    try:
        import datasets

        split = "test" if limit is None else f"test[:{limit}]"
        rows = datasets.load_dataset(hub_id, task, split=split)
    except Exception as error:  # noqa: BLE001 - every hub failure gets the same remedy
        raise LongBenchDataError(
            f"could not load LongBench task {task!r} from the hub ({hub_id}): {type(error).__name__}: {error}. "
            f"Use local files instead: {_DATA_DIR_HINT}"
        ) from None
    return [dict(row) for row in rows]


def check_hub_data(hub_id: str) -> None:
    """Fail in a second, before any model loads, when the data must come from the hub, the hub cannot be used
    (offline, or no connection) and no copy is in the local caches: `datasets` would retry for most of a minute."""
    from kvbench.models import hub_unavailable

    offline = os.environ.get("HF_DATASETS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    why = "HF_DATASETS_OFFLINE is set" if offline else hub_unavailable()
    if why is None or _hub_data_cached(hub_id):
        return
    raise LongBenchDataError(f"benchmark.data_dir is null, so LongBench is read from the hub ({hub_id}), but {why} "
                             f"and no copy is cached. Use local files instead: {_DATA_DIR_HINT}")


def _hub_data_cached(hub_id: str) -> bool:
    """A copy of `hub_id` in the hub cache or in `datasets`' cache (its folders are named `<org>___<name>`)."""
    try:
        import datasets.config
        from huggingface_hub import constants
    except ImportError:
        return False
    if (Path(constants.HF_HUB_CACHE) / f"datasets--{hub_id.replace('/', '--')}").is_dir():
        return True
    return any(Path(datasets.config.HF_DATASETS_CACHE).glob(f"{hub_id.split('/')[0]}___*"))


def load_task(task: str, source: DataSource) -> list[dict]:
    """The samples of one LongBench task (`<task>_e` for LongBench-E), in file order.

    With `source.path` set, reads `<path>/<task>.jsonl`, verified against the manifest unless `source.verify` is
    False; otherwise loads `source.hub_id` with `datasets`. `source.limit` keeps the first N samples.
    """
    task_filename(task)  # validate the name before touching disk or network
    if source.path is None:
        return _load_from_hub(task, source.hub_id, source.limit)
    path = local_task_file(task, source.path)
    if source.verify:
        verify_file(path)
    return read_jsonl(path, source.limit)
