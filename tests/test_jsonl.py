"""The one JSON-lines reader: LF-only line ends, line numbers in errors, repair of a torn last line."""
import json

import pytest

from kvbench.errors import KvbenchError
from kvbench.jsonl import numbered_jsonl, read_jsonl
from kvbench.longbench.scoring import read_predictions


def test_separators_that_json_allows_inside_strings_do_not_split_a_record(tmp_path):
    # results.py writes predictions with ensure_ascii=False, so a model's output may hold U+2028 / U+0085 raw.
    records = [{"pred": "a\u2028b\u0085c\x0bd", "answers": ["x"]}, {"pred": "e", "answers": ["y"]}]
    path = tmp_path / "trec.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_jsonl(path, "fix") == records
    assert read_predictions(path) == records


def test_line_numbers_count_blank_lines_and_crlf_and_bom_are_fine(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n{"a": 2}\r\n')
    assert list(numbered_jsonl(path, "fix", bom=True)) == [(1, {"a": 1}), (3, {"a": 2})]
    path.write_bytes(b'{"a": 1}\n\n{"a": \n')
    with pytest.raises(KvbenchError, match=r"x.jsonl, line 3: not valid JSON .*; delete it"):
        read_jsonl(path, "delete it")


def test_a_bad_prediction_record_names_its_line(tmp_path):
    path = tmp_path / "trec.jsonl"
    path.write_text('\n{"pred": "a", "answers": ["x"]}\n\n{"answers": ["y"]}\n', encoding="utf-8")
    with pytest.raises(KvbenchError, match=r"trec.jsonl, line 4"):
        read_predictions(path)


def test_torn_last_line_is_cut_only_with_repair_and_only_when_last(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n{"a": ')
    with pytest.raises(KvbenchError, match="line 3"):
        read_jsonl(path, "fix")
    assert path.read_bytes().endswith(b'{"a": ')  # reading without repair never writes
    with pytest.warns(UserWarning, match="incomplete last line"):
        assert read_jsonl(path, "fix", repair=True) == [{"a": 1}, {"a": 2}]
    assert path.read_bytes() == b'{"a": 1}\n{"a": 2}\n'
    path.write_bytes(b'{"a": \n{"a": 2}')  # a broken line in the middle is not an interrupted write
    with pytest.raises(KvbenchError, match="line 1"):
        read_jsonl(path, "fix", repair=True)


def test_reading_a_prefix_stops_early(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\nnot json at all\n')
    values = numbered_jsonl(path, "fix")
    assert [next(values), next(values)] == [(1, {"a": 1}), (2, {"a": 2})]


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(KvbenchError, match=r"not UTF-8 text .*offset 16, line 2\); fix"):
        read_jsonl(path, "fix")
