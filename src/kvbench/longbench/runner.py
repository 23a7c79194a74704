"""LongBench / LongBench-E runs: data -> prompts -> generation -> prediction files -> scores.

What a command selects (`benchmark.tasks`, `benchmark.limit`) is what it scores: a folder may hold more (a larger
limit or other tasks from earlier runs with the same settings); those stay on disk, untouched, and are reported
as `also_on_disk` in scores.json, never mixed into this command's numbers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kvbench.benchmark import Benchmark, Prompt, Sample, register
from kvbench.config import BOOL, POS_INT, STR, STR_LIST, optional
from kvbench.errors import KvbenchError
from kvbench.longbench.data import (DataSource, check_hub_data, load_manifest, load_task, local_task_file,
                                    verify_file)
from kvbench.longbench.protocol import (Protocol, ProtocolError, _check_max_input_len, build_prompt,
                                        build_split_prompt, generation_settings)
from kvbench.longbench.scoring import BUCKETS, score_folder, score_records, score_sample
from kvbench.longbench.session import context_groups, session_ids
from kvbench.longbench.tasks import CATEGORIES_EN, CATEGORIES_ZH, CHINESE_5, ENGLISH_16, SHORT, task_spec
from kvbench.models import ModelSpec
from kvbench.query import check_query_mode
from kvbench.sample_rows import SAMPLES_KEY
from kvbench.sessions import check_session_answers, turn_scores

log = logging.getLogger("kvbench")
BYTES_PER_TOKEN = 4.0  # the sweep's prompt-length estimate from a task file's bytes


@dataclass
class LongBenchPlan(Benchmark):
    name = "longbench"
    schema = {"tasks": STR_LIST, "data_dir": optional(STR), "hub_id": STR, "verify_checksums": BOOL,
              "limit": optional(POS_INT), "max_new_tokens": optional(POS_INT), "query": STR, "session": BOOL,
              "session_answers": STR}
    sessions = True  # samples sharing a context asked in turn (longbench/session.py)
    uses_protocol = True
    papers_figures = True
    table_layout = {"en": (CATEGORIES_EN, ENGLISH_16), "zh": (CATEGORIES_ZH, CHINESE_5)}
    abbreviations = SHORT
    tasks: list[str]
    source: DataSource
    protocol: Protocol
    max_input_len: int | None
    longbench_e: bool
    context_len: int | None = None  # the model's context (trained_len): longer final prompts get a warning
    query: str = "aware"
    max_new_tokens: int | None = None  # a cap on each task's official max_gen (a recorded deviation); None: official
    session: bool = False  # the samples sharing a context asked in turn in one conversation (longbench/session.py)
    session_answers: str = "gold"
    _selected: dict = dataclasses.field(default_factory=dict, repr=False)
    _warned: bool = dataclasses.field(default=False, repr=False)

    @classmethod
    def plan(cls, cfg, spec) -> "LongBenchPlan":
        return plan_longbench(cfg, spec)

    @classmethod
    def sweep_work(cls, cfg) -> list[tuple[str, int, float, float]]:
        """Per task: the task file's mean bytes per sample (bundled manifest) / 4 bytes per token, capped at
        `model.max_input_len` (prompts are truncated to it), and the task's generation limit."""
        work = []
        for task in cfg.benchmark.tasks:
            entry = load_manifest().get(f"{task}.jsonl")
            if entry is None:
                raise KvbenchError(f"unknown LongBench task {task!r} in benchmark.tasks (no {task}.jsonl in the "
                                   f"manifest)")
            limit = cfg.benchmark.get("limit")
            samples = min(entry["lines"], limit) if limit else entry["lines"]
            mean_tokens = entry["bytes_lf"] / entry["lines"] / BYTES_PER_TOKEN
            cap = cfg.model.get("max_input_len")  # null: no truncation (InternLM2.5-1M)
            prompt = min(mean_tokens, cap) if cap else mean_tokens
            work.append((task, samples, prompt * samples, task_spec(task).max_new_tokens * samples))
        return work

    @classmethod
    def headline(cls, scores: dict) -> float | None:
        return scores.get("avg_en16") if scores.get("avg_en16") is not None else scores.get("avg")

    @classmethod
    def rescore(cls, run_dir: Path) -> list[dict]:
        run_dir = Path(run_dir)
        e = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("benchmark") == "longbench_e"
        return score_folder(run_dir / "predictions", e=e)[SAMPLES_KEY]

    def protocol_name(self) -> str:
        return (self.protocol.name + ("_agnostic" if self.query == "agnostic" else "")
                + (f"_session{'' if self.session_answers == 'gold' else 'model'}" if self.session else ""))

    def settings(self) -> dict:
        # `limit` and `tasks` are not settings: a larger selection continues the same run.
        data = str(Path(self.source.path).expanduser().resolve()) if self.source.path else self.source.hub_id
        return {"name": "longbench_e" if self.longbench_e else "longbench", "protocol": self.protocol.to_dict(),
                "max_input_len": self.max_input_len, "data": data,
                **({"query": self.query} if self.query != "aware" else {}),  # aware: the fingerprint of old runs
                **({"max_new_tokens": self.max_new_tokens} if self.max_new_tokens else {}),
                **({"session": True, "session_answers": self.session_answers,
                    "turn_order": "samples sharing a context, in data-file order"} if self.session else {})}

    def selection(self) -> dict:
        return {"tasks": list(self.tasks), "limit": self.source.limit}

    def check_tokenizer(self, tokenizer) -> None:
        """Checks that need the tokenizer, run before the model weights load."""
        if self.protocol.chat_template == "model" and not getattr(tokenizer, "chat_template", None) \
                and any(task_spec(t).chat for t in self.tasks):
            raise ProtocolError(f"protocol={self.protocol.name} wraps chat tasks in the model's chat template, and "
                                f"this tokenizer has none; use protocol=dynamickv (raw prompts) for a base model")

    def select(self) -> list[Sample]:
        self._selected = {}
        samples = []
        for task in self.tasks:
            examples = load_task(task, self.source)
            self._selected[task] = [ex.get("_id") for ex in examples]
            if self.session:  # one session per group of samples sharing a context, asked in data-file order
                samples += [Sample(task, group[0].get("_id"), group, turns=len(group))
                            for group in context_groups(examples)]
            else:
                samples += [Sample(task, ex.get("_id"), ex) for ex in examples]
        return samples

    def prompts(self, todo, tokenizer, model):
        task = todo[0].task
        base = task_spec(task).name
        settings = generation_settings(base, tokenizer, getattr(model, "generation_config", None), self.protocol)
        if self.max_new_tokens and self.max_new_tokens < settings.max_new_tokens:
            settings = dataclasses.replace(settings, max_new_tokens=self.max_new_tokens)
        limits = (settings.max_new_tokens, tuple(settings.stop_token_ids), settings.min_new_tokens)
        if self.session:
            for sample in todo:
                context_ids, turns = session_ids(base, sample.data, tokenizer, self.protocol, self.max_input_len)
                yield sample, Prompt(context_ids, *limits, turns=turns, session_answers=self.session_answers,
                                     info={"context_tokens": len(context_ids)})
            return
        if self.query == "agnostic":  # samples sharing a context run back to back: compressed once, asked many
            splits = {s.key: build_split_prompt(base, s.data, tokenizer, self.protocol, self.max_input_len)
                      for s in todo}
            for sample in group_by_context(todo, lambda s: splits[s.key][0].context_ids):
                split, prompt = splits[sample.key]
                self._warn_long(task, len(split.input_ids))
                yield sample, Prompt(split.context_ids, *limits, question_ids=split.question_ids,
                                     info={"prompt": prompt, "final": len(split.input_ids), "split": split.info})
            return
        for sample in todo:
            prompt = build_prompt(base, sample.data, tokenizer, self.protocol, self.max_input_len)
            self._warn_long(task, len(prompt.input_ids))
            yield sample, Prompt(prompt.input_ids, *limits, info={"prompt": prompt, "final": len(prompt.input_ids)})

    def _warn_long(self, task: str, final: int) -> None:
        if self.context_len and final > self.context_len and not self._warned:
            self._warned = True
            log.warning("%s: a final prompt has %d tokens, more than the model's context (%d): the chat "
                        "template is added after truncation to max_input_len=%s, as LongBench's pred.py "
                        "does (recorded per sample as prompt_tokens)", task, final, self.context_len,
                        self.max_input_len)

    def record(self, sample, prompt, out, text) -> dict:
        example, built, final = sample.data, prompt.info["prompt"], prompt.info["final"]
        record = {"pred": text, "answers": example["answers"], "all_classes": example.get("all_classes"),
                  "length": example["length"], "_id": example.get("_id"), "truncated": built.truncated,
                  "original_tokens": built.original_tokens,
                  "over_max_input_len": self.max_input_len is not None and final > self.max_input_len,
                  **out.log_fields()}
        if "split" in prompt.info:
            record["split"] = prompt.info["split"]  # question kind, truncation, boundary shift
        return record

    def record_turn(self, sample, prompt, turn, out, text) -> dict:
        example = sample.data[turn]
        return {"pred": text, "answers": example["answers"], "all_classes": example.get("all_classes"),
                "length": example["length"], "_id": example.get("_id"), "session": sample.key, "turn": turn + 1,
                "answer_ids": list(out.token_ids), "context_tokens": prompt.info["context_tokens"],
                **out.log_fields()}

    def summarize(self, store) -> dict:
        return self.score(store, self._selected)

    def score(self, store, selected: dict[str, list]) -> dict:
        """Scores of exactly the selected samples; the other records in the folder are counted as also on disk."""
        chosen, also = {}, {}
        for task, ids in selected.items():
            wanted = set(ids)
            records = store.records(task)  # each _id once
            chosen[task] = [r for r in records if r.get("_id") in wanted]
            if len(chosen[task]) < len(wanted):
                raise KvbenchError(f"{store.prediction_file(task)} lacks {len(wanted) - len(chosen[task])} of the "
                                   f"selected samples; rerun the same command to complete it")
            if len(records) > len(chosen[task]):
                also[task] = len(records) - len(chosen[task])
        for task in store.tasks_done():
            if task not in selected:
                also[task] = len(store.records(task))
        scores = score_records(chosen, e=self.longbench_e)
        if self.session:  # per task, the mean score (x100) over sessions at each turn
            scores["turn_scores"] = {task: turn_scores(records, lambda r, t=task: 100 * score_sample(
                task_spec(t).name, r["pred"], r["answers"], r.get("all_classes"))) for task, records in chosen.items()}
        scores["selection"] = self.selection()
        scores["also_on_disk"] = also
        return scores


def plan_longbench(cfg: DictConfig, spec: ModelSpec) -> LongBenchPlan:
    """Check everything that does not need the model: task names, the data folder, every selected task file (present
    and verified), max_input_len and the protocol."""
    bench = cfg.benchmark
    is_e = bench.name == "longbench_e"
    tasks = list(bench.tasks)
    if not tasks:
        raise KvbenchError("benchmark.tasks is empty; list tasks, e.g. benchmark.tasks=[qasper,multi_news]")
    if len(set(tasks)) < len(tasks):
        raise KvbenchError(f"benchmark.tasks lists a task twice: {tasks}; list each task once")
    for task in tasks:
        task_spec(task)  # unknown names fail here, before any model is loaded
        if is_e != task.endswith("_e"):
            kind = "LongBench-E tasks end with _e" if is_e else "use benchmark=longbench_e for *_e tasks"
            raise KvbenchError(f"task {task!r} does not fit benchmark={bench.name}: {kind}")
    if bench.data_dir is not None:
        if not Path(bench.data_dir).expanduser().is_dir():
            raise KvbenchError(f"benchmark.data_dir={bench.data_dir} is not a folder; point it at the unzipped "
                               f"LongBench data (the <task>.jsonl files of data.zip)")
        for task in tasks:
            path = local_task_file(task, bench.data_dir)
            if bench.verify_checksums:
                verify_file(path)
    else:
        check_hub_data(bench.hub_id)  # offline: fails here, before the model loads
    _check_max_input_len(spec.max_input_len)
    protocol_cfg = OmegaConf.to_container(cfg.protocol, resolve=True)
    protocol_cfg.pop("methods", None)  # the method defaults and per-model table of the same papers
    protocol_cfg.pop("per_model", None)
    source = DataSource(path=bench.data_dir, hub_id=bench.hub_id, verify=bench.verify_checksums,
                        limit=bench.limit)
    return LongBenchPlan(tasks, source, Protocol.from_dict(protocol_cfg), spec.max_input_len, is_e,
                         spec.trained_len, check_query_mode(bench.get("query", "aware")),
                         bench.get("max_new_tokens"), bool(bench.get("session", False)),
                         check_session_answers(bench.get("session_answers", "gold")))


@register
class LongBenchE(LongBenchPlan):
    """LongBench-E: the same plan (`plan_longbench` tells the two apart), scored per length bucket; the papers'
    figures are LongBench's."""
    name = "longbench_e"
    papers_figures = False
    sessions = False
    group_table = {"field": "bucket", "groups": BUCKETS, "stem": "by_length", "title": "by input length",
                   "unit": "bucket", "note": "Mean over the run's {part}LongBench-E tasks of each length bucket's score "
                                             "(0-100); n: samples in the bucket."}


register(LongBenchPlan)


def group_by_context(items: list, context_of) -> list:
    """`items` reordered so that those with identical context ids are adjacent (groups in first-seen order)."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(tuple(context_of(item)), []).append(item)
    return [item for group in groups.values() for item in group]
