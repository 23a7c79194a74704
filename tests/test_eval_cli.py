"""`python -m kvbench.eval DIR [--e]`: scores a folder and writes the official result.json."""
import json
import math
import subprocess
import sys

from kvbench.eval import main

TREC_CLASSES = ["Location", "Other location", "City"]


def _write_jsonl(path, records, newline="\n"):
    text = "".join(json.dumps(record, ensure_ascii=False) + newline for record in records)
    path.write_bytes(text.encode("utf-8"))


def _make_folder(folder):
    """hotpotqa 1/2 right, trec 1/1, samsum first line exact (CRLF file), count 1/2 right."""
    _write_jsonl(folder / "hotpotqa.jsonl", [
        {"pred": "Paris", "answers": ["Paris"], "all_classes": None, "length": 100, "_id": "a", "kv_bytes": 1},
        {"pred": "Rome", "answers": ["Paris"], "all_classes": None, "length": 5000, "_id": "b", "kv_bytes": 1},
    ])
    _write_jsonl(folder / "trec.jsonl", [
        {"pred": "City\nLocation", "answers": ["City"], "all_classes": TREC_CLASSES, "length": 9000},
    ])
    _write_jsonl(folder / "samsum.jsonl", [
        {"pred": "\nAnn will call Bob.\nextra", "answers": ["Ann will call Bob."], "all_classes": None,
         "length": 300},
    ], newline="\r\n")
    _write_jsonl(folder / "passage_count.jsonl", [
        {"pred": "14", "answers": ["14"], "all_classes": None, "length": 12000},
        {"pred": "14 or 30", "answers": ["14"], "all_classes": None, "length": 12000},
    ])


def test_main_writes_official_result_json(tmp_path, capsys):
    _make_folder(tmp_path)
    assert main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert result == {"hotpotqa": 50.0, "passage_count": 75.0, "samsum": 100.0, "trec": 100.0}
    out = capsys.readouterr().out
    assert "hotpotqa" in out and "50.00" in out and "Avg (tasks present)" in out and "81.25" in out
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file


def test_main_longbench_e_flag_writes_buckets(tmp_path):
    _make_folder(tmp_path)
    assert main([str(tmp_path), "--e"]) == 0
    result = json.loads((tmp_path / "result.json").read_text(encoding="utf-8"))
    assert result["hotpotqa"]["0-4k"] == 100.0 and result["hotpotqa"]["4-8k"] == 0.0
    assert math.isnan(result["hotpotqa"]["8k+"])  # empty bucket, NaN like official eval.py
    assert result["passage_count"]["8k+"] == 75.0
    assert result["trec"]["8k+"] == 100.0
    assert math.isnan(result["trec"]["0-4k"]) and math.isnan(result["trec"]["4-8k"])


def test_main_accepts_a_run_folder_with_predictions_subfolder(tmp_path):
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    _make_folder(predictions)
    assert main([str(tmp_path)]) == 0
    assert json.loads((predictions / "result.json").read_text())["trec"] == 100.0


def test_main_user_errors_exit_2_with_message(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "no *.jsonl prediction files" in capsys.readouterr().err
    _write_jsonl(tmp_path / "hotpotqa.jsonl", [{"pred": "a", "answers": ["a"]}])
    (tmp_path / "notes.jsonl").write_text("{}\n")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "notes.jsonl: unknown LongBench task 'notes'" in err
    assert not (tmp_path / "result.json").exists()


def test_module_runs_as_a_script(tmp_path):
    _make_folder(tmp_path)
    done = subprocess.run([sys.executable, "-m", "kvbench.eval", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "passage_count" in done.stdout
    (tmp_path / "trec.jsonl").write_text('{"pred": "x", "answers": \n')
    done = subprocess.run([sys.executable, "-m", "kvbench.eval", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "trec.jsonl, line 1: not valid JSON" in done.stderr


def test_missing_pred_key_and_non_utf8_bytes_are_one_line_errors(tmp_path, capsys):
    # Issue 10 items 6 and 10: name the missing key; a non-UTF-8 byte is an error, not a traceback.
    _write_jsonl(tmp_path / "trec.jsonl", [{"answers": ["City"], "all_classes": TREC_CLASSES, "length": 9}])
    assert main([str(tmp_path)]) == 2
    assert "the 'pred' key (the model output) is missing" in capsys.readouterr().err
    (tmp_path / "trec.jsonl").write_bytes(b'{"pred": "Cit\xff", "answers": ["City"], "all_classes": null}\n')
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "trec.jsonl: not UTF-8 text" in err and len(err.strip().splitlines()) == 1
