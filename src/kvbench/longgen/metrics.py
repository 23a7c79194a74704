"""Exact scoring of a reproduced list, per sample.

Both the prediction and the reference are split into lines; each line is stripped, its leading item number
("12." or "12)") removed and its inner whitespace collapsed; empty lines are dropped. Lines are compared exactly
(case and punctuation count). Per sample:
- `score`: in-order line recall = (longest common subsequence of predicted and reference lines) / reference lines.
  A skipped, changed or inserted line costs only itself; lines out of order or repeated earn nothing extra.
- `exact`: 1 when the predicted lines are exactly the reference lines;
- `prefix`: the share of reference lines reproduced correctly before the first error (LongProc's "partial accuracy"
  of path_traversal, princeton-pli/LongProc `longproc_data.py`).
A task's score is the mean `score` x 100, rounded to 2 decimals.
"""
from __future__ import annotations

import re
from typing import Sequence

_NUMBER = re.compile(r"^\d+\s*[.)]\s*")


def normalize_lines(text: str) -> list[str]:
    lines = (" ".join(_NUMBER.sub("", line.strip()).split()) for line in text.splitlines())
    return [line for line in lines if line]


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def line_scores(prediction: str, reference: Sequence[str]) -> dict:
    """{"score", "exact", "prefix"} of one prediction against the reference lines (each in [0, 1])."""
    pred = normalize_lines(prediction)
    ref = normalize_lines("\n".join(reference))
    if not ref:
        raise ValueError("a reference list needs at least one line")
    lead = 0
    while lead < min(len(pred), len(ref)) and pred[lead] == ref[lead]:
        lead += 1
    return {"score": round(_lcs(pred, ref) / len(ref), 6), "exact": float(pred == ref),
            "prefix": round(lead / len(ref), 6)}


def sample_score(prediction: str, reference: Sequence[str]) -> float:
    return line_scores(prediction, reference)["score"]


def task_score(scores: Sequence[float]) -> float | None:
    return round(sum(scores) / len(scores) * 100, 2) if scores else None
