"""LongBench data loading: manifest verification, CRLF copies, corrupt files, limits and error messages."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kvbench.errors import KvbenchError
from kvbench.longbench import data
from kvbench.longbench.data import DataSource, load_manifest, load_task, manifest_path, verify_file

REAL_DIR = Path("/work/shared/data/longbench")
REAL_TASKS = ["multi_news", "multifieldqa_zh", "passage_retrieval_zh"]

pytestmark = pytest.mark.skipif(not REAL_DIR.is_dir(), reason="shared LongBench files not available")


def _copy(task: str, folder: Path) -> Path:
    target = folder / f"{task}.jsonl"
    shutil.copyfile(REAL_DIR / f"{task}.jsonl", target)
    return target


def _write_crlf_copy(task: str, folder: Path) -> Path:
    target = folder / f"{task}.jsonl"
    target.write_bytes((REAL_DIR / f"{task}.jsonl").read_bytes().replace(b"\n", b"\r\n"))
    return target


def test_manifest_is_bundled_and_lists_all_34_files():
    manifest = load_manifest()
    assert len(manifest) == 34  # 21 tasks + 13 LongBench-E files
    assert manifest["multifieldqa_en.jsonl"]["lines"] == 150
    assert manifest["lcc_e.jsonl"]["lines"] == 300
    assert manifest_path().name == "longbench_manifest.json"
    manifest["multi_news.jsonl"]["lines"] = -1  # callers get a copy: the cached manifest stays intact
    assert load_manifest()["multi_news.jsonl"]["lines"] == 200


@pytest.mark.parametrize("task", REAL_TASKS)
def test_real_files_verify_and_load_in_file_order(task):
    samples = load_task(task, DataSource(path=REAL_DIR))
    assert len(samples) == 200
    assert verify_file(REAL_DIR / f"{task}.jsonl") == "lf"
    assert all(s["dataset"] == task for s in samples)
    assert set(samples[0]) == {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"}


def test_multi_news_first_and_limit_samples():
    samples = load_task("multi_news", DataSource(path=REAL_DIR, limit=3))
    assert [s["_id"] for s in samples][0] == "e45abfcb82a3c862c0f772e6f461866839955c11ea2f46a8"
    assert samples[2]["_id"] == "82cafb9831bcafa681b45205a34677e2bf6b6c2fb992649f"
    assert len(samples) == 3
    assert samples[0]["input"] == "" and samples[0]["length"] == 2099


def test_modified_copy_fails_naming_file_expectation_and_opt_out(tmp_path):
    path = _copy("multi_news", tmp_path)
    content = path.read_bytes()
    path.write_bytes(content.replace(b"Occupy Philadelphia", b"Occupy Philadelphie", 1))
    with pytest.raises(KvbenchError) as error:
        load_task("multi_news", DataSource(path=tmp_path))
    message = str(error.value)
    assert str(path) in message
    assert "f8817c00af317c2d7f81128f334bcfe5780c6c2a515d5c96811aa0ddf8b5ee6b" in message  # expected LF hash
    assert hashlib.sha256(path.read_bytes()).hexdigest() in message  # what was found
    assert "200 lines" in message
    assert "benchmark.verify_checksums=false" in message
    # The opt-out really skips the check and loads the modified content.
    loaded = load_task("multi_news", DataSource(path=tmp_path, verify=False))
    assert "Occupy Philadelphie" in loaded[0]["context"]


def test_truncated_copy_reports_line_counts(tmp_path):
    path = tmp_path / "multi_news.jsonl"
    lines = (REAL_DIR / "multi_news.jsonl").read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:150]))
    with pytest.raises(KvbenchError, match="expected 200 lines.*found 150 lines"):
        verify_file(path)


def test_crlf_copy_with_manifest_crlf_hash_passes(tmp_path):
    path = _write_crlf_copy("multi_news", tmp_path)
    assert verify_file(path) == "crlf"
    samples = load_task("multi_news", DataSource(path=tmp_path))
    original = load_task("multi_news", DataSource(path=REAL_DIR))
    assert samples == original  # json.loads ignores the trailing CR


def test_crlf_copy_without_manifest_crlf_hash_passes_on_normalised_lf_hash(tmp_path):
    path = _write_crlf_copy("passage_retrieval_zh", tmp_path)
    manifest = load_manifest()
    manifest["passage_retrieval_zh.jsonl"]["sha256_crlf"] = None
    manifest["passage_retrieval_zh.jsonl"]["bytes_crlf"] = None
    assert verify_file(path, manifest) == "crlf-normalised"


def test_crlf_copy_with_changed_content_still_fails(tmp_path):
    path = tmp_path / "passage_retrieval_zh.jsonl"
    content = (REAL_DIR / "passage_retrieval_zh.jsonl").read_bytes().replace(b"\n", b"\r\n")
    path.write_bytes(content.replace(b"\"_id\"", b"\"_iD\"", 1))
    manifest = load_manifest()
    manifest["passage_retrieval_zh.jsonl"]["sha256_crlf"] = None
    with pytest.raises(KvbenchError, match="passage_retrieval_zh.jsonl does not match the manifest"):
        verify_file(path, manifest)


def test_normalised_hash_handles_cr_lf_split_across_chunks(tmp_path, monkeypatch):
    # 5-byte chunks put some CRs at the end of one chunk and their LF at the start of the next.
    monkeypatch.setattr(data, "_CHUNK_BYTES", 5)
    content = b'{"a": 1}\r\n{"b": 22}\r\n\r\nx\ry\r\n'
    path = tmp_path / "f.jsonl"
    path.write_bytes(content)
    digest = data._digest_file(path)
    assert digest.sha256 == hashlib.sha256(content).hexdigest()
    assert digest.sha256_lf == hashlib.sha256(content.replace(b"\r\n", b"\n")).hexdigest()
    assert digest.lines == 4 and digest.has_crlf


def test_line_count_includes_a_last_line_without_newline(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}')
    assert data._digest_file(path).lines == 2


def test_verification_is_cached_per_path_size_mtime(tmp_path, monkeypatch):
    path = _copy("multifieldqa_zh", tmp_path)
    calls = []
    real_digest = data._digest_file
    monkeypatch.setattr(data, "_digest_file", lambda p: calls.append(p) or real_digest(p))
    for _ in range(3):
        load_task("multifieldqa_zh", DataSource(path=tmp_path, limit=1))
    assert len(calls) == 1
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))  # new size and mtime: hashed again
    assert verify_file(path) == "crlf"
    assert len(calls) == 2


def test_corrupt_line_names_file_and_line_number(tmp_path):
    path = tmp_path / "multi_news.jsonl"
    lines = (REAL_DIR / "multi_news.jsonl").read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]) + b'{"input": "", "context": "cut off\n' + b"".join(lines[4:6]))
    with pytest.raises(KvbenchError, match=r"multi_news.jsonl, line 4: not valid JSON"):
        load_task("multi_news", DataSource(path=tmp_path, verify=False))
    # The first three samples are intact, so a limit that stops before line 4 still loads.
    assert len(load_task("multi_news", DataSource(path=tmp_path, verify=False, limit=3))) == 3


def test_non_object_line_is_rejected(tmp_path):
    path = tmp_path / "trec.jsonl"
    path.write_text('{"input": "q", "context": "c"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(KvbenchError, match="line 2: a JSON list"):
        load_task("trec", DataSource(path=tmp_path, verify=False))


def test_missing_folder_names_path_and_data_dir_setting(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(KvbenchError) as error:
        load_task("multi_news", DataSource(path=missing))
    assert str(missing) in str(error.value) and "benchmark.data_dir" in str(error.value)


def test_missing_file_lists_the_files_the_folder_has(tmp_path):
    _copy("multi_news", tmp_path)
    (tmp_path / "trec.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(KvbenchError) as error:
        load_task("qasper", DataSource(path=tmp_path))
    message = str(error.value)
    assert str(tmp_path / "qasper.jsonl") in message
    assert "the folder has: multi_news.jsonl, trec.jsonl" in message


def test_missing_file_points_at_the_data_subfolder_of_data_zip(tmp_path):
    (tmp_path / "data").mkdir()
    _copy("multi_news", tmp_path / "data")
    with pytest.raises(KvbenchError, match=r"benchmark.data_dir=.*/data"):
        load_task("multi_news", DataSource(path=tmp_path))


def test_longbench_e_reads_the_e_file(tmp_path):
    shutil.copyfile(REAL_DIR / "multi_news.jsonl", tmp_path / "multi_news_e.jsonl")
    # The _e file has its own manifest entry (294 lines), so this copy of the base file must fail verification ...
    with pytest.raises(KvbenchError, match="multi_news_e.jsonl does not match.*expected 294 lines"):
        load_task("multi_news_e", DataSource(path=tmp_path))
    # ... and loads when verification is off.
    assert len(load_task("multi_news_e", DataSource(path=tmp_path, verify=False, limit=5))) == 5


@pytest.mark.parametrize("bad", ["multi-news", "narrativeqa_e"])
def test_unknown_task_names_are_clear_errors(tmp_path, bad):
    with pytest.raises(KvbenchError, match="LongBench"):
        load_task(bad, DataSource(path=tmp_path))


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "10"])
def test_invalid_limit_is_rejected(limit):
    with pytest.raises(KvbenchError, match="benchmark.limit must be a positive integer"):
        DataSource(path=REAL_DIR, limit=limit)


def test_hub_failure_becomes_error_pointing_at_data_dir(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(KvbenchError) as error:
        load_task("multi_news", DataSource(path=None))
    message = str(error.value)
    assert "THUDM/LongBench" in message and "no internet" in message
    assert "benchmark.data_dir" in message and "data.zip" in message


def test_hub_rows_become_dicts_and_limit_slices_the_split(monkeypatch):
    import datasets

    seen = {}

    def fake_load(hub_id, name, split):
        seen.update(hub_id=hub_id, name=name, split=split)
        return [{"input": "q", "context": "c", "_id": str(i)} for i in range(2)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rows = load_task("trec", DataSource(path=None, hub_id="me/LongBench", limit=2))
    assert seen == {"hub_id": "me/LongBench", "name": "trec", "split": "test[:2]"}
    assert rows == [{"input": "q", "context": "c", "_id": "0"}, {"input": "q", "context": "c", "_id": "1"}]


def test_file_outside_manifest_is_rejected(tmp_path):
    path = tmp_path / "mydata.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n", encoding="utf-8")
    with pytest.raises(KvbenchError, match="not a LongBench file listed in the manifest"):
        verify_file(path)
