"""LongBench / LongBench-E runs: data -> prompts -> generation -> prediction files -> scores.

What a command selects (`benchmark.tasks`, `benchmark.limit`) is what it scores: a folder may hold more (a larger
limit or other tasks from earlier runs with the same settings); those stay on disk, untouched, and are reported
as `also_on_disk` in scores.json, never mixed into this command's numbers.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kvbench.errors import KvbenchError
from kvbench.longbench.data import DataSource, check_hub_data, load_task, local_task_file, verify_file
from kvbench.longbench.protocol import (Protocol, ProtocolError, _check_max_input_len, build_prompt,
                                        build_split_prompt, generation_settings)
from kvbench.longbench.scoring import score_records, score_sample
from kvbench.longbench.session import context_groups, session_ids
from kvbench.longbench.tasks import task_spec
from kvbench.models import ModelSpec
from kvbench.progress import progress
from kvbench.query import check_query_mode
from kvbench.sessions import check_session_answers, resume_answers, turn_scores

log = logging.getLogger("kvbench")


@dataclass
class LongBenchPlan:
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

    def run(self, store, model, tokenizer, run_one, show_progress: bool, on_sample=None) -> dict:
        generation_config = getattr(model, "generation_config", None)
        selected: dict[str, list] = {}
        warned = False
        for task in self.tasks:
            examples = load_task(task, self.source)
            selected[task] = [ex.get("_id") for ex in examples]
            done = store.done(task)
            todo = [ex for ex in examples if ex.get("_id") not in done]
            base = task_spec(task).name
            settings = generation_settings(base, tokenizer, generation_config, self.protocol)
            if self.max_new_tokens and self.max_new_tokens < settings.max_new_tokens:
                settings = dataclasses.replace(settings, max_new_tokens=self.max_new_tokens)
            bar_desc = f"{task} ({len(examples) - len(todo)} done)" if len(todo) < len(examples) else task
            if self.session:
                self.run_sessions(task, examples, store, tokenizer, run_one, settings, show_progress, on_sample)
                continue
            splits = {}
            if self.query == "agnostic":  # samples sharing a context run back to back: compressed once, asked many
                splits = {id(ex): build_split_prompt(base, ex, tokenizer, self.protocol, self.max_input_len)
                          for ex in todo}
                todo = group_by_context(todo, lambda ex: splits[id(ex)][0].context_ids)
            for example in progress(todo, len(todo), bar_desc, show_progress):
                if splits:
                    split, prompt = splits[id(example)]
                    final = len(split.input_ids)
                else:
                    prompt = build_prompt(base, example, tokenizer, self.protocol, self.max_input_len)
                    final = len(prompt.input_ids)
                if self.context_len and final > self.context_len and not warned:
                    warned = True
                    log.warning("%s: a final prompt has %d tokens, more than the model's context (%d): the chat "
                                "template is added after truncation to max_input_len=%s, as LongBench's pred.py "
                                "does (recorded per sample as prompt_tokens)", task, final, self.context_len,
                                self.max_input_len)
                if splits:
                    out, text = run_one(split.context_ids, settings.max_new_tokens, settings.stop_token_ids,
                                        settings.min_new_tokens, question_ids=split.question_ids)
                else:
                    out, text = run_one(prompt.input_ids, settings.max_new_tokens, settings.stop_token_ids,
                                        settings.min_new_tokens)
                record = {"pred": text, "answers": example["answers"], "all_classes": example.get("all_classes"),
                          "length": example["length"], "_id": example.get("_id"), "truncated": prompt.truncated,
                          "original_tokens": prompt.original_tokens,
                          "over_max_input_len": self.max_input_len is not None and final > self.max_input_len,
                          **out.log_fields()}
                if splits:
                    record["split"] = split.info  # question kind, truncation, boundary shift
                store.append(task, record)
                if on_sample:
                    on_sample(task, record)
        return self.score(store, selected)

    def run_sessions(self, task, examples, store, tokenizer, run_one, settings, show_progress, on_sample) -> None:
        """One session per group of samples sharing a context, each turn (sample) written as it ends; a killed
        session resumes at its first unanswered turn, replaying the recorded answers."""
        base = task_spec(task).name
        records = {r.get("_id"): r for r in store.records(task)}
        groups = [g for g in context_groups(examples) if any(ex.get("_id") not in records for ex in g)]
        for group in progress(groups, len(groups), f"{task} sessions", show_progress):
            answered = resume_answers([records[ex["_id"]] for ex in group if ex.get("_id") in records], len(group))
            context_ids, turns = session_ids(base, group, tokenizer, self.protocol, self.max_input_len)

            def on_turn(i, out, text, group=group, answered=answered, context_ids=context_ids):
                if i < len(answered):
                    return
                example = group[i]
                record = {"pred": text, "answers": example["answers"], "all_classes": example.get("all_classes"),
                          "length": example["length"], "_id": example.get("_id"), "session": group[0].get("_id"),
                          "turn": i + 1, "answer_ids": list(out.token_ids), "context_tokens": len(context_ids),
                          **out.log_fields()}
                store.append(task, record)
                if on_sample:
                    on_sample(task, record)

            run_one(context_ids, settings.max_new_tokens, settings.stop_token_ids, settings.min_new_tokens,
                    turns=turns, answered=answered, on_turn=on_turn)

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


def group_by_context(items: list, context_of) -> list:
    """`items` reordered so that those with identical context ids are adjacent (groups in first-seen order)."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(tuple(context_of(item)), []).append(item)
    return [item for group in groups.values() for item in group]
