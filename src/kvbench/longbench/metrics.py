"""The official LongBench v1 metrics, re-implemented to give identical numbers (quirks included).

Every metric has the official signature `metric(prediction, ground_truth, **kwargs) -> float` and the same
behaviour as THUDM/LongBench `metrics.py` (also used unchanged by KVCache-Factory, SnapKV and DynamicKV):

* `rouge_score` uses the PyPI `rouge` package (1.0.1, not Google's `rouge-score`); any exception it raises
  (empty hypothesis, RecursionError on very long sentences) gives 0.0, as the official bare `except` does.
* `classification_score` removes items from a list while iterating over it, so some partial matches survive.
* `code_sim_score` uses `fuzzywuzzy.fuzz.ratio`; its numbers depend on whether python-Levenshtein is
  installed (see `FUZZ_BACKEND`). The KV-compression papers ran with python-Levenshtein.

Deviations that change no number: one shared `Rouge` object that computes only ROUGE-L (the official call also
computes ROUGE-1/2 and throws them away; they raise exactly when ROUGE-L raises), punctuation sets built once,
and every ROUGE call gets the recursion headroom the official script had (see OFFICIAL_ROUGE_HEADROOM), so the
RecursionError -> 0.0 cases do not depend on how deep the harness calls from.
"""
from __future__ import annotations

import logging
import re
import string
import sys
from collections import Counter

import jieba
from fuzzywuzzy import fuzz
from rouge import Rouge

from kvbench.errors import KvbenchError

__all__ = [
    "normalize_answer", "normalize_zh_answer", "qa_f1_score", "qa_f1_zh_score", "rouge_score",
    "rouge_zh_score", "classification_score", "retrieval_score", "retrieval_zh_score", "count_score",
    "code_sim_score", "METRICS", "FUZZ_BACKEND",
]

# jieba logs "Building prefix dict..." on first use; that is noise in a results table.
jieba.setLogLevel(logging.WARNING)

_EN_PUNCTUATION = frozenset(string.punctuation)
# Verbatim the official `cn_punctuation` string (it ends with an ASCII '.').
_CN_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
    "–—‘’‛“”„‟…‧﹏."
)
_ZH_PUNCTUATION = frozenset(string.punctuation + _CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DIGIT_RUNS = re.compile(r"\d+")
_PARAGRAPH_EN = re.compile(r"Paragraph (\d+)")
_PARAGRAPH_ZH = re.compile(r"段落(\d+)")

# ROUGE-L only, F only: the same numbers as the default Rouge() read at ["rouge-l"]["f"], less work per call.
_ROUGE_L = Rouge(metrics=["rouge-l"], stats=["f"])

# fuzzywuzzy silently falls back to difflib without python-Levenshtein, which changes code_sim_score.
FUZZ_BACKEND = "python-Levenshtein" if fuzz.SequenceMatcher.__module__.startswith("fuzzywuzzy.StringMatcher") \
    else "difflib"


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the words a/an/the, collapse whitespace (SQuAD style)."""
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _EN_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(s: str) -> str:
    """Lower-case, drop ASCII and Chinese punctuation, remove all whitespace."""
    text = "".join(ch for ch in s.lower() if ch not in _ZH_PUNCTUATION)
    return "".join(text.split())


def _f1_score(prediction_tokens: list, ground_truth_tokens: list) -> float:
    """Bag-of-tokens F1; the official code returns the int 0 when nothing overlaps, kept as is."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token F1 after `normalize_answer` (English QA tasks and triviaqa)."""
    return _f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    """jieba precise-mode tokens, each normalised, empty ones dropped."""
    tokens = (normalize_zh_answer(token) for token in jieba.cut(text, cut_all=False))
    return [token for token in tokens if len(token) > 0]


def qa_f1_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Token F1 over jieba tokens (multifieldqa_zh)."""
    return _f1_score(_zh_tokens(prediction), _zh_tokens(ground_truth))


# How many more Python frames the official eval.py, run as a script, can push when its rouge_score calls
# Rouge.get_scores: recursion limit 1000 minus <module>, scorer, rouge_score (and rouge_zh_score for Chinese).
# rouge 1.0.1 reconstructs the LCS recursively, so a sentence pair of ~990+ words raises RecursionError, which
# the official code scores 0.0. Where exactly that happens depends on how deep the caller's stack is; we give
# every call the official headroom so the 0.0 cases are the official ones wherever the harness calls from.
# (Measured on CPython 3.11 with a script of the official structure; tests/test_metrics.py re-measures it.)
OFFICIAL_ROUGE_HEADROOM = {"en": 996, "zh": 995}


def _recursion_headroom() -> int:
    """Frames that can still be pushed below the caller's level before RecursionError (about 1 ms)."""
    depth = 0

    def dive():
        nonlocal depth
        depth += 1
        dive()

    try:
        dive()
    except RecursionError:
        pass
    return depth


def _frame_depth() -> int:
    """Python frames on the stack (a cheap lower bound of the interpreter's recursion depth)."""
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def _cannot_recurse_out(prediction: str, ground_truth: str, official_headroom: int) -> bool:
    """True when no LCS reconstruction can come near either recursion limit, so no probe is needed.

    rouge's _recon goes at most (hyp sentence words + ref sentence words + 1) deep, 6 frames below get_scores.
    """
    def longest_sentence(text: str) -> int:
        return max((len(piece.split()) for piece in text.split(".")), default=0)

    needed = longest_sentence(prediction) + longest_sentence(ground_truth) + 7 + 64  # 64: generous margin
    return needed < official_headroom and needed < sys.getrecursionlimit() - _frame_depth()


def _rouge_l_f(prediction: str, ground_truth: str, official_headroom: int) -> float:
    """ROUGE-L F with the recursion headroom official eval.py had; any exception gives 0.0 as there."""
    old_limit = sys.getrecursionlimit()
    if not _cannot_recurse_out(prediction, ground_truth, official_headroom):
        sys.setrecursionlimit(old_limit + official_headroom - _recursion_headroom())
    try:
        scores = _ROUGE_L.get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official bare except: empty hypothesis, RecursionError on very long sentences
        return 0.0
    finally:
        sys.setrecursionlimit(old_limit)
    return scores["rouge-l"]["f"]


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """ROUGE-L F of PyPI `rouge` 1.0.1 (summary level, case-sensitive); any exception gives 0.0."""
    return _rouge_l_f(prediction, ground_truth, OFFICIAL_ROUGE_HEADROOM["en"])


def rouge_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """`rouge_score` on space-joined jieba tokens (dureader, vcsum)."""
    prediction = " ".join(jieba.cut(prediction, cut_all=False))
    ground_truth = " ".join(jieba.cut(ground_truth, cut_all=False))
    return _rouge_l_f(prediction, ground_truth, OFFICIAL_ROUGE_HEADROOM["zh"])


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """1/len(matches) if the ground-truth class is among the class names found in the prediction (trec, lsht).

    Requires `all_classes` in kwargs. The removal loop below deliberately mutates the list it iterates over,
    as the official code does: an element right after a removed one is skipped and survives.
    """
    all_classes = kwargs.get("all_classes")
    if all_classes is None:
        raise KvbenchError(
            "classification_score needs all_classes=[...] (trec/lsht prediction files must carry the "
            "'all_classes' list of the dataset; official eval.py reads it from the last line)"
        )
    em_match_list = [class_name for class_name in all_classes if class_name in prediction]
    for match_term in em_match_list:
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    if ground_truth in em_match_list:
        return 1.0 / len(em_match_list)
    return 0.0


def _digit_run_share(prediction: str, target: str) -> float:
    """Share of the digit runs in the prediction that equal the target number string."""
    numbers = _DIGIT_RUNS.findall(prediction)
    if len(numbers) == 0:
        return 0.0
    right = sum(1 for number in numbers if number == str(target))
    return float(right / len(numbers))


def _paragraph_id(pattern: re.Pattern, ground_truth: str, task_hint: str) -> str:
    """The first paragraph number in the ground truth (the official code indexes matches[0])."""
    matches = pattern.findall(ground_truth)
    if not matches:
        raise KvbenchError(
            f"{task_hint}: ground truth {ground_truth[:60]!r} has no '{pattern.pattern}' id; "
            "are the answers from the right task file?"
        )
    return matches[0]


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_retrieval_en: share of the numbers in the prediction that equal the 'Paragraph N' id."""
    return _digit_run_share(prediction, _paragraph_id(_PARAGRAPH_EN, ground_truth, "retrieval_score"))


def retrieval_zh_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_retrieval_zh: share of the numbers in the prediction that equal the '段落N' id."""
    return _digit_run_share(prediction, _paragraph_id(_PARAGRAPH_ZH, ground_truth, "retrieval_zh_score"))


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_count: share of the numbers in the prediction that equal the ground-truth count."""
    return _digit_run_share(prediction, ground_truth)


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """fuzz.ratio/100 between the ground truth and the first prediction line with no '`', '#' or '//'.

    Only leading newlines are stripped, so a blank or whitespace-only line can be the one scored.
    """
    chosen = ""
    for line in prediction.lstrip("\n").split("\n"):
        if ("`" not in line) and ("#" not in line) and ("//" not in line):
            chosen = line
            break
    return fuzz.ratio(chosen, ground_truth) / 100


# Name (as in kvbench.longbench.tasks.TaskSpec.metric) -> function.
METRICS = {
    fn.__name__: fn
    for fn in (qa_f1_score, qa_f1_zh_score, rouge_score, rouge_zh_score, classification_score,
               retrieval_score, retrieval_zh_score, count_score, code_sim_score)
}
