"""Per-sample, per-task and per-folder LongBench scores, identical to the official `eval.py`.

Official rules reproduced here:
* per sample: max over the answers of `metric(pred, answer, all_classes=...)`, starting from 0.; trec, triviaqa,
  samsum and lsht score only `pred.lstrip('\\n').split('\\n')[0]`;
* per task: `round(100 * sum / n, 2)`, with `all_classes` taken from the LAST line of the file;
* LongBench-E: buckets by the `length` field (<4000, <8000, else), `round(100 * np.mean(bucket), 2)`;
  an empty bucket is NaN (numpy would say NaN too, plus a RuntimeWarning we avoid).

`score_folder` also returns the per-sample scores its task scores average (key `sample_scores`, rows of
`kvbench.sample_rows`): the pipeline writes them to `sample_scores.jsonl` for confidence intervals and paired tests.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from kvbench.errors import KvbenchError
from kvbench.jsonl import numbered_jsonl
from kvbench.longbench import metrics
from kvbench.longbench.tasks import CATEGORIES_EN, CATEGORIES_ZH, ENGLISH_16, task_spec
from kvbench.sample_rows import SAMPLES_KEY, sample_row

__all__ = [
    "BUCKETS", "score_sample", "score_task", "score_task_e", "summarize", "read_predictions",
    "prediction_files", "score_folder", "score_records", "sample_scores",
]

BUCKETS = ("0-4k", "4-8k", "8k+")


def score_sample(task: str, pred: str, answers: list[str], all_classes: list[str] | None) -> float:
    """Score of one prediction: the best metric value over the reference answers (0. if there are none)."""
    spec = task_spec(task)
    metric = metrics.METRICS[spec.metric]
    if spec.first_line:
        pred = pred.lstrip("\n").split("\n")[0]
    score = 0.0
    for ground_truth in answers:
        score = max(score, metric(pred, ground_truth, all_classes=all_classes))
    return score


def _check_record(record: object, where: str, need_length: bool = False) -> None:
    """Raise a KvbenchError if one prediction record could not be scored or would be scored wrongly."""
    if not isinstance(record, dict):
        raise KvbenchError(f"{where}: expected a JSON object with 'pred' and 'answers', got {type(record).__name__}")
    if "pred" not in record:
        raise KvbenchError(f"{where}: the 'pred' key (the model output) is missing; each line needs 'pred' and "
                           f"'answers'")
    if not isinstance(record.get("pred"), str):
        raise KvbenchError(f"{where}: 'pred' must be a string (the model output), got {record.get('pred')!r:.60}")
    answers = record.get("answers")
    # A bare string would be iterated character by character: a silently wrong score.
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise KvbenchError(f"{where}: 'answers' must be a list of strings, got {answers!r:.60}")
    classes = record.get("all_classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise KvbenchError(f"{where}: 'all_classes' must be null or a list of strings, got {classes!r:.60}")
    if need_length:
        length = record.get("length")
        if isinstance(length, bool) or not isinstance(length, (int, float)):
            raise KvbenchError(
                f"{where}: LongBench-E scoring needs the dataset's 'length' field (a number), got {length!r}"
            )


def _checked_predictions(task: str, predictions: list[dict], need_length: bool = False) -> list[dict]:
    """Validate all records; an empty list is an error (official eval.py would divide by zero)."""
    if len(predictions) == 0:
        raise KvbenchError(f"{task}: no predictions to score; run the predictions first (the file is empty)")
    for index, record in enumerate(predictions):
        _check_record(record, f"{task} prediction #{index + 1}", need_length)
    return predictions


def _last_all_classes(task: str, predictions: list[dict]) -> list[str] | None:
    """all_classes of the last record, as official eval.py (it keeps overwriting the variable while reading)."""
    all_classes = predictions[-1].get("all_classes")
    if all_classes is None and metrics.METRICS[task_spec(task).metric] is metrics.classification_score:
        raise KvbenchError(
            f"{task}: the last prediction has no 'all_classes'; write the dataset's all_classes list into every "
            "line of the prediction file"
        )
    return all_classes


def _sample_scores(task: str, predictions: list[dict], need_length: bool = False) -> list[float]:
    """Validated per-sample scores of one task, all_classes from the last record."""
    _checked_predictions(task, predictions, need_length)
    all_classes = _last_all_classes(task, predictions)
    return [score_sample(task, record["pred"], record["answers"], all_classes) for record in predictions]


def sample_scores(task: str, predictions: list[dict], need_length: bool = False) -> list[float]:
    """The per-sample scores (0..1) whose mean x 100 is the task score; all_classes from the last record."""
    return _sample_scores(task, predictions, need_length)


def _sample_rows(file_task: str, records: list[dict], scores: list[float], is_e: bool) -> list[dict]:
    """`sample_scores.jsonl` rows of one task: id = the record's `_id` (`#<line>` for files without one)."""
    rows = []
    for index, (record, score) in enumerate(zip(records, scores), 1):
        sample_id = record.get("_id") if record.get("_id") is not None else f"#{index}"
        extra = {"length": record["length"], "bucket": _bucket_of(record["length"])} if is_e else {}
        rows.append(sample_row(file_task, sample_id, score, **extra))
    return rows


def _official_mean(scores: list[float]) -> float:
    """round(100 * total / n, 2) with the sequential sum of official `scorer()` (same last digit)."""
    total_score = 0.0
    for score in scores:
        total_score += score
    return round(100 * total_score / len(scores), 2)


def _bucket_of(length: float) -> str:
    """LongBench-E bucket of a sample by its `length` field (words, or characters for Chinese)."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def _bucket_means(scores: list[float], lengths: list[float]) -> dict[str, float]:
    """Per-bucket round(100 * np.mean, 2); np.mean's pairwise sum and numpy's round keep the official digits."""
    buckets: dict[str, list[float]] = {name: [] for name in BUCKETS}
    for score, length in zip(scores, lengths):
        buckets[_bucket_of(length)].append(score)
    return {
        name: float(round(100 * np.mean(values), 2)) if values else float("nan")
        for name, values in buckets.items()
    }


def score_task(task: str, predictions: list[dict]) -> float:
    """Official task score in 0..100: round(100 * mean of the sample scores, 2).

    `predictions` are records with 'pred', 'answers' and (trec/lsht) 'all_classes'; extra keys are ignored.
    """
    return _official_mean(_sample_scores(task, predictions))


def score_task_e(task: str, predictions: list[dict]) -> dict[str, float]:
    """LongBench-E task score per length bucket {"0-4k", "4-8k", "8k+"}; an empty bucket is NaN."""
    scores = _sample_scores(task, predictions, need_length=True)
    return _bucket_means(scores, [record["length"] for record in predictions])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _category_means(task_scores: dict[str, float], categories: dict[str, list[str]]) -> dict[str, float]:
    """Mean of each category whose tasks are all present."""
    return {
        category: _mean([task_scores[t] for t in tasks])
        for category, tasks in categories.items()
        if all(t in task_scores for t in tasks)
    }


def summarize(task_scores: dict[str, float]) -> dict:
    """Averages of per-task scores (0..100), unrounded.

    Returns {"avg_en16": mean of the 16 English tasks or None unless all 16 are present,
    "avg": mean over the tasks present (None if none), "categories": English-table category means,
    "categories_zh": Chinese-table category means (only categories whose tasks are all present),
    "avg_categories_en"/"avg_categories_zh": the official leaderboard "Avg" (mean of the 6 category means),
    None unless all 6 are present}. `_e` task names count as their base task.
    """
    scores = {task_spec(task).name: float(value) for task, value in task_scores.items()}
    if any(math.isnan(value) for value in scores.values()):
        raise KvbenchError("summarize() got a NaN task score; pass overall task scores, not LongBench-E buckets")
    categories_en = _category_means(scores, CATEGORIES_EN)
    categories_zh = _category_means(scores, CATEGORIES_ZH)
    return {
        "avg_en16": _mean([scores[t] for t in ENGLISH_16]) if all(t in scores for t in ENGLISH_16) else None,
        "avg": _mean(list(scores.values())) if scores else None,
        "categories": categories_en,
        "categories_zh": categories_zh,
        "avg_categories_en": _mean(list(categories_en.values())) if len(categories_en) == len(CATEGORIES_EN) else None,
        "avg_categories_zh": _mean(list(categories_zh.values())) if len(categories_zh) == len(CATEGORIES_ZH) else None,
    }


def read_predictions(path: str | Path) -> list[dict]:
    """Records of a prediction JSONL file; blank lines are skipped, CRLF and a UTF-8 BOM are fine.

    A line that is not a JSON object with 'pred' and 'answers' is a KvbenchError naming file and line.
    """
    path = Path(path)
    records = []
    for line_number, record in numbered_jsonl(
            path, "fix or delete that line (a run killed mid-write leaves a half line at the end); prediction files "
                  "are UTF-8 JSON lines", bom=True):
        _check_record(record, f"{path}, line {line_number}")
        records.append(record)
    _warn_on_duplicate_ids(path, records)
    return records


def _warn_on_duplicate_ids(path: Path, records: list[dict]) -> None:
    """Official pred.py appends, so a rerun doubles lines; the score stays official but the user should know."""
    ids = [record["_id"] for record in records if "_id" in record]
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        warnings.warn(f"{path}: {duplicates} duplicate _id line(s); were predictions appended twice?", stacklevel=3)


def _task_of_file(path: Path) -> str:
    """Task name = file name up to the first '.', as official eval.py."""
    return path.name.split(".")[0]


def prediction_files(folder: str | Path) -> list[Path]:
    """Sorted `*.jsonl` files of a predictions folder (or of `<run dir>/predictions`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KvbenchError(f"{folder} is not a folder; pass the folder that holds the <task>.jsonl prediction files")
    files = sorted(folder.glob("*.jsonl"))
    if not files and (folder / "predictions").is_dir():
        files = sorted((folder / "predictions").glob("*.jsonl"))
    if not files:
        raise KvbenchError(f"no *.jsonl prediction files in {folder} (or in {folder / 'predictions'})")
    for path in files:
        task = _task_of_file(path)
        try:
            task_spec(task)
        except KvbenchError as error:
            raise KvbenchError(f"{path.name}: {error}. Rename the file or move it out of the folder.") from None
    return files


def _is_e_file(path: Path, e: bool) -> bool:
    return e or _task_of_file(path).endswith("_e")


def score_folder(path: str | Path, e: bool = False) -> dict:
    """Score every `*.jsonl` in a predictions folder.

    `e=True` treats every file as LongBench-E (official `eval.py --e`); otherwise `<task>_e.jsonl` files are.
    Returns {"benchmark": "longbench" | "longbench_e", "tasks": {task: score}, "n": {task: lines},
    "result": {file task name: score or bucket dict} (the official result.json), "longbench_e": {task: buckets}
    (LongBench-E only), "sample_scores": per-sample rows (task = base task name)} plus the averages of `summarize`
    over "tasks" (base task names).
    """
    files = prediction_files(path)
    e_flags = {_is_e_file(file, e) for file in files}
    if len(e_flags) > 1:
        raise KvbenchError(
            f"{path} mixes LongBench and LongBench-E (*_e.jsonl) prediction files; score them in separate folders"
        )
    is_e = e_flags.pop()
    records = {}
    for file in files:
        file_task = _task_of_file(file)
        if any(task_spec(t).name == task_spec(file_task).name for t in records):
            raise KvbenchError(f"{path} has two prediction files for task {task_spec(file_task).name!r}; keep one")
        records[file_task] = read_predictions(file)
    return score_records(records, e=is_e)


def score_records(records_by_task: dict[str, list[dict]], e: bool = False) -> dict:
    """Score prediction records grouped by task (file task names, `<task>_e` for LongBench-E); the same summary as
    `score_folder` (which reads the records from files)."""
    is_e = e or any(task.endswith("_e") for task in records_by_task)
    tasks, counts, result, buckets, samples = {}, {}, {}, {}, []
    for file_task, records in records_by_task.items():
        base = task_spec(file_task).name
        scores = _sample_scores(base, records, need_length=is_e)
        tasks[base] = _official_mean(scores)
        counts[base] = len(records)
        samples += _sample_rows(base, records, scores, is_e)
        if is_e:
            buckets[base] = _bucket_means(scores, [record["length"] for record in records])
        result[file_task] = buckets[base] if is_e else tasks[base]
    summary = {"benchmark": "longbench_e" if is_e else "longbench", "tasks": tasks, "n": counts, "result": result}
    summary.update(summarize(tasks))
    if is_e:
        summary["longbench_e"] = buckets
    summary[SAMPLES_KEY] = samples
    return summary
