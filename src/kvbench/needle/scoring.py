"""Needle-in-a-Haystack scores: the two the papers use, and the retrieval score.

``rouge_score_x10`` is what the reference stores in its result files (ROUGE-1 F x 10, 0..10);
``heatmap_score`` is what its heatmaps and reported averages show (word overlap, 0..1). Four of the expected
answer's 11 distinct words are "a", "in", "and", "on", so any fluent non-answer scores about 0.3 there.
``retrieval_score`` measures retrieval: 1 when the response names all of the needle's key facts ("sandwich" and
"Dolores Park" for the papers' needle, declared with each needle in ``prompt.CITY_NEEDLES``), else 0.
"""

from __future__ import annotations

import re
from functools import lru_cache

from kvbench.errors import KvbenchError
from kvbench.needle.prompt import EXPECTED_ANSWER, KEY_FACTS, NEEDLE, needle_facts
from kvbench.sample_rows import sample_row

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


def heatmap_score(response: str, divisor: str = "distinct", expected: str = EXPECTED_ANSWER) -> float:
    """Share of the expected answer's words found in ``response`` (lower-cased, split on spaces).

    ``divisor="distinct"`` divides by the 11 distinct words (current ``visualize.py``; a perfect
    answer scores 1.0); ``"len"`` divides by all 12 words (June-2024 version; perfect = 0.917).
    Punctuation stays attached, so "day" does not match "day.".
    """
    if divisor not in DIVISORS:
        raise KvbenchError(f"Unknown heatmap divisor {divisor!r}. Fix: use one of {DIVISORS}.")
    words = _EXPECTED_WORDS if expected == EXPECTED_ANSWER else expected.lower().split()  # other: K-needle variant
    found = set(response.lower().split()) & set(words)
    total = len(set(words)) if divisor == "distinct" else len(words)
    return len(found) / total


def _words(text: str) -> str:
    """Lower-cased letters and digits, every other character a word break: "Dolores-Park's" -> "dolores park s"."""
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def retrieval_score(response: str, facts: tuple[str, ...] = KEY_FACTS) -> float:
    """1.0 when ``response`` contains every key fact as whole words (case and punctuation ignored), else 0.0."""
    text = f" {_words(response)} "
    return float(all(f" {_words(fact)} " in text for fact in facts))


def cell_retrieval(record: dict) -> float | None:
    """A prediction line's retrieval score: the stored one, or (lines written before it existed) the score of its
    response against the key facts of the needle it asked about (`needle`, 0 for the single-needle test); None for a
    line without a response."""
    stored = record.get("retrieval")
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and stored == stored:  # not NaN
        return float(stored)
    if not isinstance(record.get("response"), str):
        return None
    return retrieval_score(record["response"], needle_facts(int(record.get("needle", 0))))


def needle_sample_scores(records: list[dict]) -> list[dict]:
    """`sample_scores.jsonl` rows of a needle run: one per cell (id `<length>_<depth>`), its heatmap score (0..1)
    as `score` and its retrieval score (0 or 1) as `retrieval`.

    The records' stored `score` is used as is (the run scored each cell once when it generated it); `retrieval` too,
    and lines without it (older runs) are scored from their response.
    """
    return [sample_row("needle", r.get("cell", f"{r['context_length']}_{r['depth_percent']}"), r["score"],
                       retrieval=cell_retrieval(r), context_length=r["context_length"],
                       depth_percent=r["depth_percent"]) for r in records]
