"""RULER's task definitions, verbatim: templates, answer prefixes, tokens to generate, per-task arguments.

Sources (NVIDIA/RULER at c3f5e3b): `scripts/data/synthetic/constants.py` (templates), `scripts/synthetic.yaml`
(per-task arguments), `scripts/eval/synthetic/constants.py` (metric per family). The question / answer regexes
that split a prompt into context | question | answer prefix are kvpress's
(`evaluation/benchmarks/ruler/create_huggingface_dataset.py`).
"""
from __future__ import annotations

# Generic template per task family (RULER constants.py TASKS). Escapes kept as in the source: "\n" is a newline.
FAMILIES: dict[str, dict] = {
    "niah": {
        "tokens_to_generate": 128,
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                    "magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    },
    "variable_tracking": {
        "tokens_to_generate": 30,
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                         "variables are assigned the value {query}, they are: ",
    },
    "common_words_extraction": {
        "tokens_to_generate": 120,
        "template": "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
                    "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
                    "above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:",
    },
    "freq_words_extraction": {
        "tokens_to_generate": 50,
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                    "text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:",
    },
    "qa": {
        "tokens_to_generate": 32,
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any "
                    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
                    "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: "
                    "{query}",
        "answer_prefix": " Answer:",
    },
}

# RULER synthetic.yaml: the 13 tasks, in its order (the papers' column order).
TASKS: dict[str, dict] = {
    "niah_single_1": {"family": "niah", "args": dict(type_haystack="noise", type_needle_k="words",
                                                     type_needle_v="numbers", num_needle_k=1, num_needle_v=1,
                                                     num_needle_q=1)},
    "niah_single_2": {"family": "niah", "args": dict(type_haystack="essay", type_needle_k="words",
                                                     type_needle_v="numbers", num_needle_k=1, num_needle_v=1,
                                                     num_needle_q=1)},
    "niah_single_3": {"family": "niah", "args": dict(type_haystack="essay", type_needle_k="words",
                                                     type_needle_v="uuids", num_needle_k=1, num_needle_v=1,
                                                     num_needle_q=1)},
    "niah_multikey_1": {"family": "niah", "args": dict(type_haystack="essay", type_needle_k="words",
                                                       type_needle_v="numbers", num_needle_k=4, num_needle_v=1,
                                                       num_needle_q=1)},
    "niah_multikey_2": {"family": "niah", "args": dict(type_haystack="needle", type_needle_k="words",
                                                       type_needle_v="numbers", num_needle_k=1, num_needle_v=1,
                                                       num_needle_q=1)},
    "niah_multikey_3": {"family": "niah", "args": dict(type_haystack="needle", type_needle_k="uuids",
                                                       type_needle_v="uuids", num_needle_k=1, num_needle_v=1,
                                                       num_needle_q=1)},
    "niah_multivalue": {"family": "niah", "args": dict(type_haystack="essay", type_needle_k="words",
                                                       type_needle_v="numbers", num_needle_k=1, num_needle_v=4,
                                                       num_needle_q=1)},
    "niah_multiquery": {"family": "niah", "args": dict(type_haystack="essay", type_needle_k="words",
                                                       type_needle_v="numbers", num_needle_k=1, num_needle_v=1,
                                                       num_needle_q=4)},
    "vt": {"family": "variable_tracking", "args": dict(type_haystack="noise", num_chains=1, num_hops=4)},
    "cwe": {"family": "common_words_extraction", "args": dict(freq_cw=30, freq_ucw=3, num_cw=10, num_fewshot=1)},
    "fwe": {"family": "freq_words_extraction", "args": dict(alpha=2.0, coded_wordlen=6, vocab_size=-1)},
    "qa_1": {"family": "qa", "args": dict(dataset="squad")},
    "qa_2": {"family": "qa", "args": dict(dataset="hotpotqa")},
}
ALL_TASKS = tuple(TASKS)
QA_TASKS = ("qa_1", "qa_2")
SYNTHETIC_TASKS = tuple(t for t in ALL_TASKS if t not in QA_TASKS)

# RULER eval/synthetic/constants.py: qa is scored with string_match_part, every other family with _all.
METRIC = {family: ("string_match_part" if family == "qa" else "string_match_all") for family in FAMILIES}

# kvpress's split of a RULER prompt: context = up to the LAST match of the question regex, question = from there
# to the first match of the answer regex after it, answer prefix = the rest.
QUESTION_PATTERNS = {
    "niah": r"What (?:is|are all) the special magic",
    "variable_tracking": r"Question: Find all variables that are assigned the value",
    "common_words_extraction": r"Question: What are the 10 most common words in the above list\?",
    "freq_words_extraction": r"Question: Do not provide any explanation\.",
    "qa": r"Answer the question based on the given documents\.",
}

# niah.py NOISE haystack sentence and the needle sentence (its value type name is always plural).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DOCUMENT_PROMPT = "Document {i}:\n{document}"
# Where to get the two real-data QA sets (RULER json/download_qa_dataset.sh).
QA_FILES = {"squad": "squad.json", "hotpotqa": "hotpotqa.json"}
QA_HINT = ("put SQuAD dev-v2.0 as squad.json and HotpotQA dev-distractor-v1 as hotpotqa.json in one folder "
           "(RULER's scripts/data/synthetic/json/download_qa_dataset.sh fetches both) and pass benchmark.qa_dir=<it>")


def family_of(task: str) -> str:
    return TASKS[task]["family"]


def tokens_to_generate(task: str) -> int:
    return FAMILIES[family_of(task)]["tokens_to_generate"]

# The report's column headers (task abbreviations).
SHORT = {"niah_single_1": "S1", "niah_single_2": "S2", "niah_single_3": "S3", "niah_multikey_1": "MK1",
         "niah_multikey_2": "MK2", "niah_multikey_3": "MK3", "niah_multivalue": "MV", "niah_multiquery": "MQ",
         "vt": "VT", "cwe": "CWE", "fwe": "FWE", "qa_1": "QA1", "qa_2": "QA2"}
