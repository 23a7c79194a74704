"""The 21 LongBench tasks and their protocol constants (official LongBench v1 `config/*.json` and `eval.py`)."""
from __future__ import annotations

from dataclasses import dataclass

from kvbench.errors import KvbenchError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    language: str          # "en", "zh" or "code"
    category: str          # the official leaderboard category
    metric: str            # name of the scoring function in kvbench.longbench.metrics
    max_new_tokens: int    # dataset2maxlen
    chat: bool             # the official pred.py wraps the prompt in the model's chat format
    first_line: bool       # eval.py scores only pred.lstrip('\n').split('\n')[0]
    has_e: bool            # a LongBench-E file `<name>_e.jsonl` exists


_ROWS = [
    # name, lang, category, metric, max_gen, chat, first_line, has_e
    ("narrativeqa", "en", "Single-Doc QA", "qa_f1_score", 128, True, False, False),
    ("qasper", "en", "Single-Doc QA", "qa_f1_score", 128, True, False, True),
    ("multifieldqa_en", "en", "Single-Doc QA", "qa_f1_score", 64, True, False, True),
    ("multifieldqa_zh", "zh", "Single-Doc QA", "qa_f1_zh_score", 64, True, False, False),
    ("hotpotqa", "en", "Multi-Doc QA", "qa_f1_score", 32, True, False, True),
    ("2wikimqa", "en", "Multi-Doc QA", "qa_f1_score", 32, True, False, True),
    ("musique", "en", "Multi-Doc QA", "qa_f1_score", 32, True, False, False),
    ("dureader", "zh", "Multi-Doc QA", "rouge_zh_score", 128, True, False, False),
    ("gov_report", "en", "Summarization", "rouge_score", 512, True, False, True),
    ("qmsum", "en", "Summarization", "rouge_score", 512, True, False, False),
    ("multi_news", "en", "Summarization", "rouge_score", 512, True, False, True),
    ("vcsum", "zh", "Summarization", "rouge_zh_score", 512, True, False, False),
    ("trec", "en", "Few-shot Learning", "classification_score", 64, False, True, True),
    ("triviaqa", "en", "Few-shot Learning", "qa_f1_score", 32, False, True, True),
    ("samsum", "en", "Few-shot Learning", "rouge_score", 128, False, True, True),
    ("lsht", "zh", "Few-shot Learning", "classification_score", 64, False, True, False),
    ("passage_count", "en", "Synthetic", "count_score", 32, True, False, True),
    ("passage_retrieval_en", "en", "Synthetic", "retrieval_score", 32, True, False, True),
    ("passage_retrieval_zh", "zh", "Synthetic", "retrieval_zh_score", 32, True, False, False),
    ("lcc", "code", "Code Completion", "code_sim_score", 64, False, False, True),
    ("repobench-p", "code", "Code Completion", "code_sim_score", 64, False, False, True),
]

TASKS: dict[str, TaskSpec] = {row[0]: TaskSpec(*row) for row in _ROWS}

# The 16 tasks the KV-compression papers average ("Avg"), in their column order.
ENGLISH_16 = [
    "narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique",
    "gov_report", "qmsum", "multi_news", "trec", "triviaqa", "samsum",
    "passage_count", "passage_retrieval_en", "lcc", "repobench-p",
]
CHINESE_5 = ["multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh"]
LONGBENCH_E = [name for name, spec in TASKS.items() if spec.has_e]

# Official leaderboard categories (README): the English and the Chinese table share the code tasks.
CATEGORIES_EN = {
    "Single-Doc QA": ["narrativeqa", "qasper", "multifieldqa_en"],
    "Multi-Doc QA": ["hotpotqa", "2wikimqa", "musique"],
    "Summarization": ["gov_report", "qmsum", "multi_news"],
    "Few-shot Learning": ["trec", "triviaqa", "samsum"],
    "Synthetic": ["passage_count", "passage_retrieval_en"],
    "Code Completion": ["lcc", "repobench-p"],
}
CATEGORIES_ZH = {
    "Single-Doc QA": ["multifieldqa_zh"],
    "Multi-Doc QA": ["dureader"],
    "Summarization": ["vcsum"],
    "Few-shot Learning": ["lsht"],
    "Synthetic": ["passage_retrieval_zh"],
    "Code Completion": ["lcc", "repobench-p"],
}
# The papers' short column headers (PyramidKV / SnapKV / DynamicKV tables): tasks and the code category.
SHORT = {
    "narrativeqa": "NrtvQA", "qasper": "Qasper", "multifieldqa_en": "MF-en", "hotpotqa": "HotpotQA",
    "2wikimqa": "2WikiMQA", "musique": "Musique", "gov_report": "GovReport", "qmsum": "QMSum",
    "multi_news": "MultiNews", "trec": "TREC", "triviaqa": "TriviaQA", "samsum": "SAMSum",
    "passage_count": "PCount", "passage_retrieval_en": "PRe", "lcc": "Lcc", "repobench-p": "RB-P",
    "multifieldqa_zh": "MF-zh", "dureader": "DuReader", "vcsum": "VCSum", "lsht": "LSHT",
    "passage_retrieval_zh": "PR-zh", "Code Completion": "Code",
}


def task_spec(name: str) -> TaskSpec:
    """The spec of a task; `<task>_e` names resolve to the base task. Unknown names are a clear error."""
    base = name[:-2] if name.endswith("_e") and name[:-2] in TASKS else name
    if base not in TASKS:
        raise KvbenchError(
            f"unknown LongBench task {name!r}; choose from: {', '.join(TASKS)} (LongBench-E: add '_e' to "
            f"{', '.join(LONGBENCH_E)})"
        )
    if name.endswith("_e") and not TASKS[base].has_e:
        raise KvbenchError(f"{base!r} has no LongBench-E file; LongBench-E tasks are: {', '.join(LONGBENCH_E)}")
    return TASKS[base]
