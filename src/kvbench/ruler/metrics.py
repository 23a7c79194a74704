"""RULER's scoring (NVIDIA/RULER `scripts/eval/evaluate.py`, `scripts/eval/synthetic/constants.py`), per sample.

A prediction is stripped, every control character (`[\\x00-\\x1f]`, newlines and tabs included) replaced by a
newline, and stripped again. `string_match_all`: the fraction of reference strings found in it as case-insensitive
substrings; `string_match_part`: 1 if any is. A task's score is the mean over samples x 100, rounded to 2 decimals.
"""
from __future__ import annotations

import re
from typing import Sequence

from kvbench.ruler.constants import METRIC, family_of

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def match_all(prediction: str, references: Sequence[str]) -> float:
    pred = prediction.lower()
    return sum(1.0 if r.lower() in pred else 0.0 for r in references) / len(references)


def match_part(prediction: str, references: Sequence[str]) -> float:
    pred = prediction.lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in references)


def sample_score(task: str, prediction: str, references: Sequence[str]) -> float:
    """One sample's score in [0, 1] (the term RULER averages), after RULER's post-processing."""
    fn = match_part if METRIC[family_of(task)] == "string_match_part" else match_all
    return fn(postprocess(prediction), references)


def string_match_all(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """RULER's function on raw lists (no post-processing), x100, rounded to 2."""
    return round(sum(match_all(p, r) for p, r in zip(preds, refs)) / len(preds) * 100, 2)


def string_match_part(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    return round(sum(match_part(p, r) for p, r in zip(preds, refs)) / len(preds) * 100, 2)


def task_score(scores: Sequence[float]) -> float | None:
    """Mean of per-sample scores x 100, rounded to 2 (RULER's task score); None without samples."""
    return round(sum(scores) / len(scores) * 100, 2) if scores else None
