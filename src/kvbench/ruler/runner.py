"""RULER runs: one prediction line per (length, sample) in `predictions/<task>.jsonl`, resumable.

The plan generates (or reads, or loads from the cache) every selected sample and checks each fits the model before
any model is loaded. Selection (tasks, lengths, samples) is not a setting: a larger selection continues the run.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kvbench.benchmark import Benchmark, Prompt, Sample, register
from kvbench.config import BOOL, STR, STR_LIST, optional
from kvbench.errors import KvbenchError
from kvbench.ruler.constants import ALL_TASKS, FAMILIES, QA_TASKS, SHORT, SYNTHETIC_TASKS, TASKS
from kvbench.ruler.data import (Generator, canonical, kvpress_folder, qa_note, read_kvpress, render, set_sha256,
                                sha256_text)
from kvbench.ruler.generate import qa_file
from kvbench.ruler.metrics import sample_score, task_score
from kvbench.ruler.session import SESSION_TASKS, TURN_ORDER, TURNS, session_ids, session_keys
from kvbench.ruler.template import TEMPLATES, ModelTemplate, model_template
from kvbench.sessions import check_session_answers, turn_scores

log = logging.getLogger("kvbench")
QUERY_MODES = ("aware", "agnostic")


def sample_id(length: int, index: int) -> str:
    return f"{length}_{index}"


def sample_sha(sample: dict) -> str:
    return sha256_text(canonical(sample))[:16]


def average_label(tasks: list[str]) -> str:
    if set(tasks) == set(ALL_TASKS):
        return "13-task average"
    if set(tasks) == set(SYNTHETIC_TASKS):
        return "11-task average (qa_1, qa_2 not run)"
    return f"{len(tasks)}-task average"


class GeneratedBenchmark(Benchmark):
    """The generated benchmarks (RULER, longgen): one prediction line per (length, sample) of each task, keyed
    `<length>_<index>`; a sample on disk that was predicted on other data is refused. A subclass has tasks, lengths,
    datasets, template and query, and gives each line its score fields (`score_fields`)."""

    def select(self) -> list[Sample]:
        return [Sample(task, sample_id(length, sample["index"]), (length, sample), sample_sha(sample))
                for task in self.tasks for length in self.lengths for sample in self.datasets[(task, length)]]

    def prompts(self, todo, tokenizer, model):
        stops = tuple(stop_token_ids(model, tokenizer))
        for item in todo:
            sample = item.data[1]
            rendered = render(sample, tokenizer, self.template)
            if self.query == "agnostic":
                prompt = Prompt(rendered.context_ids, sample["max_new_tokens"], stops,
                                question_ids=rendered.question_ids)
            else:
                prompt = Prompt(rendered.input_ids, sample["max_new_tokens"], stops)
            prompt.info = {"input_tokens": len(rendered.input_ids), "context_tokens": len(rendered.context_ids),
                           "question_tokens": len(rendered.question_ids)}
            yield item, prompt

    def record(self, sample, prompt, out, text) -> dict:
        length, data = sample.data
        return {"_id": sample.key, "task": sample.task, "length": length, "index": data["index"], "pred": text,
                "outputs": data["outputs"], **self.score_fields(sample.task, text, data), "query": self.query,
                **prompt.info, "sample_sha256": sample.digest, **out.log_fields()}

    def score_fields(self, task: str, text: str, sample: dict) -> dict:
        raise NotImplementedError


@register
@dataclass
class RulerPlan(GeneratedBenchmark):
    name = "ruler"
    sessions = True  # niah_multikey_1..3, niah_multiquery: one needle per turn (ruler/session.py)
    schema = {"tasks": STR_LIST, "template": STR, "query": STR, "data_dir": optional(STR), "qa_dir": optional(STR),
              "haystack_dir": optional(STR), "cache_dir": optional(STR), "session": BOOL, "session_answers": STR}
    # lengths, samples: plan_ruler's messages  # lengths, samples: plan_ruler's messages
    table_layout = {"": ({"RULER": ALL_TASKS}, None)}
    abbreviations = SHORT
    tasks: list[str]
    lengths: list[int]
    samples: int
    template: ModelTemplate
    query: str
    source: dict                                   # what determines the samples (generator identity or data files)
    datasets: dict[tuple[str, int], list[dict]]
    skipped: dict[str, str] = field(default_factory=dict)
    generation_s: float = 0.0
    session: bool = False  # one conversation per sample: its needles asked one per turn (ruler/session.py)
    session_answers: str = "gold"

    def protocol_name(self) -> str:
        return (f"ruler_{self.template.name}" + ("_agnostic" if self.query == "agnostic" else "")
                + (f"_session{'' if self.session_answers == 'gold' else 'model'}" if self.session else ""))

    def settings(self) -> dict:
        return {"name": "ruler", "template": self.template.name, "query": self.query, "source": self.source,
                **({"session": True, "session_answers": self.session_answers, "turns": TURNS,
                    "turn_order": TURN_ORDER} if self.session else {})}

    def sample_ids(self, length: int, sample: dict) -> list[str]:
        """A sample's prediction ids: one, or one per turn of its session."""
        sid = sample_id(length, sample["index"])
        return [f"{sid}_t{t}" for t in range(1, TURNS + 1)] if self.session else [sid]

    def selection(self) -> dict:
        return {"tasks": list(self.tasks), "lengths": list(self.lengths), "samples": self.samples,
                "skipped": sorted(self.skipped)}

    def data_sha256(self) -> dict[str, str]:
        return {f"{task}@{length}": set_sha256(samples) for (task, length), samples in self.datasets.items()}

    @classmethod
    def plan(cls, cfg, spec) -> "RulerPlan":
        return plan_ruler(cfg, spec)

    @classmethod
    def sweep_work(cls, cfg) -> list[tuple[str, int, float, float]]:
        """`samples` per task and length, each prompt as long as its length, RULER's tokens_to_generate."""
        lengths = _int_list(cfg.benchmark.lengths, "benchmark.lengths")
        work = []
        for task in cfg.benchmark.tasks:
            if task not in TASKS:
                raise KvbenchError(f"unknown RULER task {task!r} in benchmark.tasks; choose from {', '.join(TASKS)}")
            samples = int(cfg.benchmark.samples) * len(lengths)
            new_tokens = FAMILIES[TASKS[task]["family"]]["tokens_to_generate"]
            work.append((task, samples, float(sum(lengths) * cfg.benchmark.samples), float(new_tokens * samples)))
        return work

    def score_fields(self, task: str, text: str, sample: dict) -> dict:
        return {"score": sample_score(task, text, sample["outputs"])}

    def select(self) -> list[Sample]:
        samples = super().select()
        if self.session:  # one session per sample: its needles asked one per turn (ruler/session.py)
            return [dataclasses.replace(s, turns=TURNS) for s in samples]
        return samples

    def prompts(self, todo, tokenizer, model):
        if not self.session:
            yield from super().prompts(todo, tokenizer, model)
            return
        stops = tuple(stop_token_ids(model, tokenizer))
        for item in todo:
            sample = item.data[1]
            context_ids, turns = session_ids(item.task, sample, tokenizer, self.template)
            yield item, Prompt(context_ids, sample["max_new_tokens"], stops, turns=turns,
                               session_answers=self.session_answers,
                               info={"asked": session_keys(item.task, sample), "context_tokens": len(context_ids)})

    def record_turn(self, sample, prompt, turn, out, text) -> dict:
        length, data = sample.data
        key, value = prompt.info["asked"][turn]
        return {"_id": f"{sample.key}_t{turn + 1}", "session": sample.key, "turn": turn + 1, "task": sample.task,
                "length": length, "index": data["index"], "key": key, "pred": text, "outputs": [value],
                "score": sample_score(sample.task, text, [value]), "answer_ids": list(out.token_ids),
                "context_tokens": prompt.info["context_tokens"], "sample_sha256": sample.digest,
                **out.log_fields()}

    def summarize(self, store) -> dict:
        """Scores of exactly this selection (records of other lengths / samples on disk are left out)."""
        by_length: dict[str, dict] = {}
        rows: list[dict] = []  # per-sample scores, the rows of sample_scores.jsonl
        for length in self.lengths:
            tasks, counts = {}, {}
            for task in self.tasks:
                wanted = {i for s in self.datasets[(task, length)] for i in self.sample_ids(length, s)}
                records = {r["_id"]: r for r in store.records(task) if r.get("_id") in wanted} \
                    if store.prediction_file(task).exists() else {}
                ordered = [records[sid] for sid in sorted(records, key=lambda s: int(s.split("_")[1]))]
                scores = [sample_score(task, r["pred"], r["outputs"]) for r in ordered]
                rows += [{"task": task, "id": r["_id"], "score": score, "context_length": length}
                         for r, score in zip(ordered, scores)]
                tasks[task], counts[task] = task_score(scores), len(scores)
            present = [t for t in self.tasks if tasks[t] is not None]
            by_length[str(length)] = {
                "tasks": tasks, "n": counts,
                "avg": round(sum(tasks[t] for t in present) / len(present), 2) if present else None,
                "avg_label": average_label(present)}
        per_task = {}
        for task in self.tasks:
            values = [by_length[str(length)]["tasks"][task] for length in self.lengths]
            values = [v for v in values if v is not None]
            per_task[task] = round(sum(values) / len(values), 2) if values else None
        averages = [v["avg"] for v in by_length.values() if v["avg"] is not None]
        turns = {}
        if self.session:  # per task, the mean over sessions at each turn
            ids = {i for (task, length), items in self.datasets.items() for s in items
                   for i in self.sample_ids(length, s)}
            turns = {"turn_scores": {task: turn_scores([r for r in store.records(task) if r.get("_id") in ids],
                                                       lambda r: 100 * r["score"]) for task in self.tasks}}
        return {
            **turns,
            "benchmark": "ruler", "query": self.query, "template": self.template.name,
            "lengths": by_length,
            "tasks": {t: v for t, v in per_task.items() if v is not None},
            "n": {t: sum(by_length[str(length)]["n"][t] for length in self.lengths) for t in self.tasks},
            "avg": round(sum(averages) / len(averages), 2) if averages else None,
            "avg_label": average_label([t for t in self.tasks if per_task[t] is not None]),
            "sample_scores": rows,  # the pipeline moves these to sample_scores.jsonl (kept in scores.json before)
            "data_sha256": self.data_sha256(),
            "skipped": self.skipped,
            "generation_s": round(self.generation_s, 2),
        }



def check_lengths_fit(benchmark: str, model: str, context: int | None, lengths: list[int]) -> int:
    """The generated benchmarks' check, before the model loads: every asked length fits the model's context
    (returned)."""
    if context is None:
        raise KvbenchError(f"{benchmark} needs {model}'s context length and its config does not say it "
                           f"(no max_position_embeddings). Fix: model.trained_len=<tokens>")
    too_long = [n for n in lengths if n > context]
    if too_long:
        raise KvbenchError(f"benchmark.lengths {too_long} exceed {model}'s context of {context} tokens. "
                           f"Fix: benchmark.lengths=[...] up to {context}")
    return context


def stop_token_ids(model, tokenizer) -> list[int]:
    """RULER's HF path stops on the model's EOS ids only (no stop words)."""
    ids = []
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    for value in ([eos] if isinstance(eos, int) else list(eos or [])) + [tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def _whole(value) -> int:
    """An integer from a config value; ValueError for anything else (2.5, true, "abc"): never truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(value)
    return int(value)


def _int_list(value, name: str) -> list[int]:
    items = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    if isinstance(items, (int, float, str)):
        items = [items]
    try:
        out = [_whole(v) for v in items]
    except (TypeError, ValueError):
        raise KvbenchError(f"{name}={value}: give a list of integers, e.g. {name}=[1024,2048]") from None
    if not out or any(v <= 0 for v in out):
        raise KvbenchError(f"{name}={value}: give positive integers, e.g. {name}=[1024,2048]")
    return out


def _check_unnamed_length(data_dir: Path, source: dict, prompt_tokens: dict[int, list[int]]) -> None:
    """kvpress files directly in `data_dir` (not in `<data_dir>/<length>/`) do not say which length they were made
    for: unless the folder is named after the length, their prompts must measure about that length (0.6x to 1.3x:
    another tokenizer than the data's counts differently), so 1024-token data is never reported as 512."""
    for length, tokens in prompt_tokens.items():
        folder = Path(source["files"][str(length)]["folder"])
        if folder != data_dir.resolve() or folder.name == str(length) or not tokens:
            continue
        mean = sum(tokens) / len(tokens)
        if not 0.6 * length <= mean <= 1.3 * length:
            raise KvbenchError(f"benchmark.data_dir={data_dir} holds its files directly and their prompts average "
                               f"{mean:.0f} tokens, not about benchmark.lengths=[{length}]. Fix: put them in "
                               f"{data_dir}/<their length>/ and select that length")


def plan_ruler(cfg: DictConfig, spec) -> RulerPlan:
    """Validate the RULER selection, then build every sample (cached) and check it fits the model."""
    from kvbench.models import load_tokenizer

    bench = cfg.benchmark
    tasks = list(bench.tasks) if bench.get("tasks") is not None else list(ALL_TASKS)
    unknown = [t for t in tasks if t not in TASKS]
    twice = sorted({t for t in tasks if tasks.count(t) > 1})
    if twice:  # one task twice would make a "2-task average" of one task
        raise KvbenchError(f"benchmark.tasks lists {', '.join(twice)} more than once; list each task once")
    if unknown or not tasks:
        raise KvbenchError(f"benchmark.tasks: unknown RULER task(s) {', '.join(map(str, unknown)) or '(none given)'}; "
                           f"choose from {', '.join(ALL_TASKS)}")
    lengths = _int_list(bench.lengths, "benchmark.lengths")
    try:
        samples = _whole(bench.samples)
    except (TypeError, ValueError):
        raise KvbenchError(f"benchmark.samples={bench.samples!r}: give a positive integer (RULER uses 500)") from None
    if samples < 1:
        raise KvbenchError(f"benchmark.samples={samples}: give a positive integer (RULER uses 500)")
    query = str(bench.get("query") or "aware")
    if query not in QUERY_MODES:
        raise KvbenchError(f"benchmark.query={query!r}: choose one of {', '.join(QUERY_MODES)}")
    template_name = str(bench.template)
    if template_name not in TEMPLATES:
        raise KvbenchError(f"benchmark.template={template_name!r}: choose one of {', '.join(TEMPLATES)}")
    session = bool(bench.get("session", False))
    answers = check_session_answers(bench.get("session_answers", "gold"))
    if session and [t for t in tasks if t not in SESSION_TASKS]:
        raise KvbenchError(f"benchmark.session=true: RULER tasks {', '.join(t for t in tasks if t not in SESSION_TASKS)} "
                           f"ask one question of their context; sessions run on {', '.join(SESSION_TASKS)} "
                           f"(benchmark.tasks=[...])")
    if session and bench.get("data_dir"):
        raise KvbenchError("benchmark.session=true needs generated RULER samples; drop benchmark.data_dir")
    limit = check_lengths_fit("RULER", cfg.model.name, spec.trained_len, lengths)
    data_dir = Path(bench.data_dir) if bench.get("data_dir") else None
    if data_dir is not None and not data_dir.is_dir():
        raise KvbenchError(f"benchmark.data_dir={data_dir} is not a folder; point it at kvpress-format RULER data "
                           f"(<data_dir>/<length>/*.parquet or *.jsonl)")
    qa_dir = str(bench.qa_dir) if bench.get("qa_dir") else None
    if qa_dir is not None and not Path(qa_dir).is_dir():
        raise KvbenchError(f"benchmark.qa_dir={qa_dir} is not a folder (it should hold squad.json / hotpotqa.json)")

    tokenizer = load_tokenizer(spec)
    template = model_template(tokenizer, template_name)
    skipped: dict[str, str] = {}
    datasets: dict[tuple[str, int], list[dict]] = {}
    start = time.perf_counter()
    if data_dir is not None:
        files = {}
        for length in lengths:
            folder = kvpress_folder(data_dir, length, single=len(lengths) == 1)
            by_task, digest = read_kvpress(folder, length)
            files[str(length)] = {"folder": str(folder.resolve()), "sha256": digest}
            for task in tasks:
                if task not in by_task:
                    raise KvbenchError(f"{folder} has no rows of task {task}; it has {', '.join(sorted(by_task))}. "
                                       f"Fix: benchmark.tasks=[...]")
                datasets[(task, length)] = by_task[task][:samples]
        source = {"kind": "kvpress", "files": files}
    else:
        gen = Generator(tokenizer, template, int(cfg.seed), bench.get("haystack_dir"), qa_dir)
        for task in [t for t in tasks if t in QA_TASKS]:
            if qa_file(qa_dir, TASKS[task]["args"]["dataset"]) is None:
                skipped[task] = qa_note(task)
                log.warning(skipped[task])
        tasks = [t for t in tasks if t not in skipped]
        if not tasks:
            raise KvbenchError("no RULER task left to run: " + "; ".join(skipped.values()))
        cache = bench.get("cache_dir") or str(Path(cfg.results_root) / ".cache" / "ruler")
        cache_dir = Path(cache) if str(cache) not in ("", "none", "None") else None
        for task in tasks:
            for length in lengths:
                datasets[(task, length)] = gen.samples(task, length, samples, cache_dir)
        source = {"kind": "generated", **gen.identity(),
                  "qa": {t: gen.qa_identity(t) for t in tasks if t in QA_TASKS}}
    generation_s = time.perf_counter() - start
    prompt_tokens: dict[int, list[int]] = {}
    for (task, length), items in datasets.items():
        for sample in items:
            rendered = render(sample, tokenizer, template)
            prompt_tokens.setdefault(length, []).append(len(rendered.input_ids))
            total = len(rendered.input_ids) + int(sample["max_new_tokens"])
            if total > limit:
                raise KvbenchError(f"RULER {task} sample {sample['index']} at length {length} needs {total} tokens "
                                   f"(prompt + {sample['max_new_tokens']} to generate), more than {cfg.model.name}'s "
                                   f"{limit}. Fix: smaller benchmark.lengths")
    if data_dir is not None:
        _check_unnamed_length(data_dir, source, prompt_tokens)
    log.info("RULER data ready in %.1f s (%d sets)", generation_s, len(datasets))
    return RulerPlan(tasks, lengths, samples, template, query, source, datasets, skipped, generation_s, session,
                     answers)


__all__ = ["GeneratedBenchmark", "RulerPlan", "plan_ruler", "stop_token_ids"]
