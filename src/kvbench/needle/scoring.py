"""The two Needle-in-a-Haystack scores the papers use.

``rouge_score_x10`` is what the reference stores in its result files (ROUGE-1 F x 10, 0..10);
``heatmap_score`` is what its heatmaps and reported averages show (word overlap, 0..1).
"""

from __future__ import annotations

from functools import lru_cache

from kvbench.errors import KvbenchError
from kvbench.needle.prompt import EXPECTED_ANSWER, NEEDLE

_EXPECTED_WORDS = EXPECTED_ANSWER.lower().split()  # 12 words, 11 distinct ("a" twice)
DIVISORS = ("distinct", "len")


@lru_cache(maxsize=1)
def _rouge_scorer():
    # One instance for all calls: building it loads the Porter stemmer.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_score_x10(response: str, needle: str = NEEDLE) -> float:
    """ROUGE-1 F-measure of ``response`` against the needle, times 10 (0 for an empty response)."""
    if not response:
        return 0.0
    return float(_rouge_scorer().score(needle, response)["rouge1"].fmeasure * 10)


def heatmap_score(response: str, divisor: str = "distinct") -> float:
    """Share of the expected answer's words found in ``response`` (lower-cased, split on spaces).

    ``divisor="distinct"`` divides by the 11 distinct words (current ``visualize.py``; a perfect
    answer scores 1.0); ``"len"`` divides by all 12 words (June-2024 version; perfect = 0.917).
    Punctuation stays attached, so "day" does not match "day.".
    """
    if divisor not in DIVISORS:
        raise KvbenchError(f"Unknown heatmap divisor {divisor!r}. Fix: use one of {DIVISORS}.")
    found = set(response.lower().split()) & set(_EXPECTED_WORDS)
    total = len(set(_EXPECTED_WORDS)) if divisor == "distinct" else len(_EXPECTED_WORDS)
    return len(found) / total


def needle_sample_scores(records: list[dict]) -> list[dict]:
    """`sample_scores.jsonl` rows of a needle run: one per cell (id `<length>_<depth>`), its heatmap score (0..1).

    The records' stored `score` is used as is (the run scored each cell once when it generated it).
    """
    from kvbench.sample_scores import sample_row

    return [sample_row("needle", r.get("cell", f"{r['context_length']}_{r['depth_percent']}"), r["score"],
                       context_length=r["context_length"], depth_percent=r["depth_percent"]) for r in records]
