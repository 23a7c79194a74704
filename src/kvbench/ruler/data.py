"""RULER sample sets: generated (and cached on disk) or read from kvpress-format files; rendered to token ids.

A generated set is identified by everything that determines it (generator version, task, length, seed, tokenizer,
model template, word lists, sentence model, essays, QA files); it is cached as JSONL under that identity, and the
sha256 of the samples a run uses is reported with its scores. Because sample i only depends on the samples before
it, a cached set of n samples serves any request for k <= n.
"""
from __future__ import annotations

import hashlib
import numbers
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kvbench.atomic import WriteError, atomic_write
from kvbench.errors import KvbenchError
from kvbench.jsonl import read_jsonl
from kvbench.ruler.constants import ALL_TASKS, QA_FILES, TASKS
from kvbench.ruler.generate import Context, generate_task, qa_file
from kvbench.ruler.resources import essay_words, punkt_record, wonderwords_record
from kvbench.ruler.template import ModelTemplate

GENERATOR_VERSION = "ruler-c3f5e3b/kvbench-1"
KVPRESS_COLUMNS = ("context", "question", "answer_prefix", "answer", "task", "max_new_tokens")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical(sample: dict) -> str:
    return json.dumps(sample, sort_keys=True, ensure_ascii=False)


def set_sha256(samples: list[dict]) -> str:
    return sha256_text("".join(canonical(s) + "\n" for s in samples))


def tokenizer_sha256(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return sha256_text(backend.to_str())
    return sha256_text(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False))


def count_tokens(tokenizer):
    """RULER's length unit: `tokenizer.tokenize(text)`, i.e. no BOS or other added special tokens."""
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


@dataclass
class Generator:
    """The identity of generated RULER data for one tokenizer and model template."""
    tokenizer: object
    template: ModelTemplate
    seed: int
    essay_folder: str | None = None
    qa_dir: str | None = None

    def identity(self) -> dict:
        _, essays = essay_words(self.essay_folder)
        return {"version": GENERATOR_VERSION, "seed": self.seed, "tokenizer_sha256": tokenizer_sha256(self.tokenizer),
                "template": self.template.record(), "wonderwords": wonderwords_record(), "punkt": punkt_record(),
                "essays": essays}

    def qa_identity(self, task: str) -> str | None:
        dataset = TASKS[task]["args"].get("dataset")
        path = qa_file(self.qa_dir, dataset) if dataset else None
        return hashlib.sha256(path.read_bytes()).hexdigest() if path else None

    def key(self, task: str, length: int) -> str:
        blob = canonical({**self.identity(), "task": task, "length": length, "qa": self.qa_identity(task)})
        return sha256_text(blob)[:16]

    def samples(self, task: str, length: int, n: int, cache_dir: Path | None) -> list[dict]:
        path = cache_dir / f"{task}_{length}_{self.key(task, length)}.jsonl" if cache_dir else None
        if path is not None and path.exists():
            cached = read_jsonl(path, f"delete {path} (a generated set, cached): it is generated again")
            if len(cached) >= n:
                return cached[:n]
        ctx = Context(task, self.seed, length, count_tokens(self.tokenizer), self.template, self.essay_folder,
                      self.qa_dir)
        samples = generate_task(ctx, n)
        if path is not None:
            _write_atomic(path, "".join(canonical(s) + "\n" for s in samples))
        return samples


def _write_atomic(path: Path, text: str) -> None:
    try:
        atomic_write(path, text)
    except WriteError as err:
        raise KvbenchError(f"cannot write the RULER data cache {path.parent} ({os.strerror(err.errno)}); set "
                           f"results_root= or benchmark.cache_dir= to a writable folder (benchmark.cache_dir=none: "
                           f"no cache)") from None


# ------------------------------------------------------------------------------------- kvpress-format files
def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as err:
            raise KvbenchError("reading parquet needs pandas and pyarrow: pip install pandas pyarrow") from err
        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow raises its own types
            raise KvbenchError(f"{path}: not a readable parquet file ({err})") from err
        rows = frame.to_dict(orient="records")
    else:
        rows = read_jsonl(path, "fix that line of the kvpress-format data")
    return [_checked_row(row, path, number) for number, row in enumerate(rows, start=1)]


def _checked_row(row, path: Path, number: int) -> dict:
    """One kvpress-format row with its fields' types checked: a one-line KvbenchError naming file, row and field."""
    where = f"{path}, row {number}"
    if not isinstance(row, dict):
        raise KvbenchError(f"{where}: expected a JSON object with {', '.join(KVPRESS_COLUMNS)}, got "
                           f"{type(row).__name__}")
    missing = [c for c in KVPRESS_COLUMNS if c not in row]
    if missing:
        raise KvbenchError(f"{where}: missing column(s) {', '.join(missing)}; kvpress's RULER format "
                           f"has {', '.join(KVPRESS_COLUMNS)}")
    for column in ("context", "question", "task"):
        if not isinstance(row[column], str):
            raise KvbenchError(f"{where}: {column} must be text, got {_shown(row[column])}")
    if row["answer_prefix"] is not None and not isinstance(row["answer_prefix"], str):
        raise KvbenchError(f"{where}: answer_prefix must be text, got {_shown(row['answer_prefix'])}")
    answers = _answers(row["answer"])
    if answers is None:
        raise KvbenchError(f"{where}: answer must be a text or a non-empty list of texts, got {_shown(row['answer'])}")
    tokens = row["max_new_tokens"]
    if not isinstance(tokens, numbers.Integral) or isinstance(tokens, bool) or tokens < 1:
        if not (isinstance(tokens, float) and tokens.is_integer() and tokens >= 1):  # parquet may store floats
            raise KvbenchError(f"{where}: max_new_tokens must be a positive integer, got {_shown(tokens)}")
    return {**row, "answer": answers, "max_new_tokens": int(tokens)}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _answers(value) -> list[str] | None:
    """The answers as texts (one text, or a list / array of texts); None when the value is neither."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        items = list(value)
        if items and all(isinstance(v, str) for v in items):
            return items
    return None


def data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".parquet", ".jsonl"))


def kvpress_folder(data_dir: Path, length: int, single: bool) -> Path:
    """`<data_dir>/<length>/` (kvpress's HF layout: configs "4096", "8192", ...) or, for one length, `data_dir`."""
    sub = data_dir / str(length)
    if sub.is_dir() and data_files(sub):
        return sub
    if single and data_files(data_dir):
        return data_dir
    raise KvbenchError(f"benchmark.data_dir={data_dir}: no .parquet/.jsonl files for length {length} (looked in {sub}"
                       f"{' and ' + str(data_dir) if single else ''}). Fix: put kvpress's RULER files in <data_dir>/"
                       f"{length}/ or select that folder's length with benchmark.lengths=[...]")


def read_kvpress(folder: Path, length: int) -> tuple[dict[str, list[dict]], str]:
    """Samples per task from kvpress-format files (rows in file order; `index` counts within a task), and the
    sha256 of the files."""
    digest = hashlib.sha256()
    by_task: dict[str, list[dict]] = {}
    for path in data_files(folder):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
        for row in _read_rows(path):
            task = str(row["task"])
            if task not in TASKS:
                raise KvbenchError(f"{path}: task {task!r} is not a RULER task ({', '.join(ALL_TASKS)})")
            items = by_task.setdefault(task, [])
            items.append({"index": len(items), "task": task, "length": length, "context": str(row["context"]),
                          "question": str(row["question"]), "answer_prefix": str(row["answer_prefix"] or ""),
                          "outputs": row["answer"], "max_new_tokens": row["max_new_tokens"],
                          "source": "kvpress"})
    return by_task, digest.hexdigest()


# ------------------------------------------------------------------------------------------------ rendering
@dataclass
class Rendered:
    context_ids: list[int]
    question_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.context_ids + self.question_ids


def _split_ids(full_ids: list[int], context_ids: list[int]) -> Rendered:
    """Cut the prompt's ids after the longest prefix they share with the context tokenised alone, so that context +
    question is exactly the one-prompt tokenisation (a token merging across the boundary goes to the question)."""
    k = 0
    for a, b in zip(full_ids, context_ids):
        if a != b:
            break
        k += 1
    if k == 0 or k == len(full_ids):
        raise KvbenchError(f"cannot split a RULER prompt into context and question ({k} of {len(full_ids)} tokens)")
    return Rendered(list(full_ids[:k]), list(full_ids[k:]))


def render(sample: dict, tokenizer, template: ModelTemplate) -> Rendered:
    """Token ids of context | question (+ answer prefix).

    Generated samples already hold RULER's full text (model template included); it is tokenised as one string, as
    RULER's HF path does (`base`: with the tokenizer's own special tokens, BOS where it adds one; `chat`: the
    template writes them), and cut where the context ends. kvpress-format samples are rendered as kvpress's
    pipeline does, each part tokenised on its own: chat: template prefix + context | question + template suffix +
    answer prefix; base: BOS + context | question + "\n" + answer prefix."""
    encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    if sample.get("source") == "kvpress":
        if template.name == "chat":
            context = template.prefix + sample["context"]
            question = sample["question"] + template.suffix + sample["answer_prefix"]
        else:
            context = (tokenizer.bos_token or "") + sample["context"]
            question = sample["question"] + "\n" + sample["answer_prefix"]
        return Rendered(encode(context), encode(question))
    full = sample["context"] + sample["question"] + sample["answer_prefix"]
    if template.name == "base":
        return _split_ids(list(tokenizer(full)["input_ids"]), list(tokenizer(sample["context"])["input_ids"]))
    return _split_ids(encode(full), encode(sample["context"]))


def qa_note(task: str) -> str:
    dataset = TASKS[task]["args"]["dataset"]
    return f"{task} skipped: it reads {QA_FILES[dataset]}; to run it, " + \
        "put SQuAD dev-v2.0 (squad.json) and HotpotQA dev-distractor-v1 (hotpotqa.json) in one folder and pass " + \
        "benchmark.qa_dir=<folder> (RULER's scripts/data/synthetic/json/download_qa_dataset.sh downloads both)"


__all__ = ["Generator", "Rendered", "render", "read_kvpress", "kvpress_folder", "set_sha256", "qa_note"]
