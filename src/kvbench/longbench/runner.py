"""LongBench / LongBench-E runs: data -> prompts -> generation -> prediction files -> scores."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kvbench.errors import KvbenchError
from kvbench.longbench.data import DataSource, load_task
from kvbench.longbench.protocol import Protocol, build_prompt, build_split_prompt, generation_settings
from kvbench.longbench.scoring import score_folder
from kvbench.longbench.tasks import task_spec
from kvbench.models import ModelSpec
from kvbench.progress import progress
from kvbench.query import check_query_mode


@dataclass
class LongBenchPlan:
    tasks: list[str]
    source: DataSource
    protocol: Protocol
    max_input_len: int | None
    longbench_e: bool
    query: str = "aware"

    def protocol_name(self) -> str:
        return self.protocol.name

    def settings(self) -> dict:
        # `limit` is not a setting: a larger limit continues the same run.
        return {"name": "longbench_e" if self.longbench_e else "longbench", "protocol": self.protocol.to_dict(),
                "max_input_len": self.max_input_len, "data": str(self.source.path or self.source.hub_id),
                **({"query": self.query} if self.query != "aware" else {})}  # aware: the fingerprint of old runs

    def run(self, store, model, tokenizer, run_one, show_progress: bool, on_sample=None) -> dict:
        generation_config = getattr(model, "generation_config", None)
        for task in self.tasks:
            examples = load_task(task, self.source)
            done = store.done(task)
            todo = [ex for ex in examples if ex.get("_id") not in done]
            base = task_spec(task).name
            settings = generation_settings(base, tokenizer, generation_config, self.protocol)
            bar_desc = f"{task} ({len(done)} done)" if done else task
            splits = {}
            if self.query == "agnostic":  # samples sharing a context run back to back: compressed once, asked many
                splits = {id(ex): build_split_prompt(base, ex, tokenizer, self.protocol, self.max_input_len)
                          for ex in todo}
                todo = group_by_context(todo, lambda ex: splits[id(ex)][0].context_ids)
            for example in progress(todo, len(todo), bar_desc, show_progress):
                if splits:
                    split, prompt = splits[id(example)]
                    out, text = run_one(split.context_ids, settings.max_new_tokens, settings.stop_token_ids,
                                        settings.min_new_tokens, question_ids=split.question_ids)
                else:
                    prompt = build_prompt(base, example, tokenizer, self.protocol, self.max_input_len)
                    out, text = run_one(prompt.input_ids, settings.max_new_tokens, settings.stop_token_ids,
                                        settings.min_new_tokens)
                record = {"pred": text, "answers": example["answers"], "all_classes": example.get("all_classes"),
                          "length": example["length"], "_id": example.get("_id"), "truncated": prompt.truncated,
                          "original_tokens": prompt.original_tokens, **out.log_fields()}
                if splits:
                    record["split"] = split.info  # question kind, truncation, boundary shift
                store.append(task, record)
                if on_sample:
                    on_sample(task, record)
        return score_folder(store.predictions_dir, e=self.longbench_e)


def plan_longbench(cfg: DictConfig, spec: ModelSpec) -> LongBenchPlan:
    bench = cfg.benchmark
    is_e = bench.name == "longbench_e"
    tasks = list(bench.tasks)
    if not tasks:
        raise KvbenchError("benchmark.tasks is empty; list tasks, e.g. benchmark.tasks=[qasper,multi_news]")
    for task in tasks:
        task_spec(task)  # unknown names fail here, before any model is loaded
        if is_e != task.endswith("_e"):
            kind = "LongBench-E tasks end with _e" if is_e else "use benchmark=longbench_e for *_e tasks"
            raise KvbenchError(f"task {task!r} does not fit benchmark={bench.name}: {kind}")
    if bench.data_dir is not None and not Path(bench.data_dir).is_dir():
        raise KvbenchError(f"benchmark.data_dir={bench.data_dir} is not a folder; point it at the unzipped "
                           f"LongBench data (the <task>.jsonl files of data.zip)")
    protocol_cfg = OmegaConf.to_container(cfg.protocol, resolve=True)
    protocol_cfg.pop("methods", None)
    source = DataSource(path=bench.data_dir, hub_id=bench.hub_id, verify=bench.verify_checksums,
                        limit=bench.limit)
    return LongBenchPlan(tasks, source, Protocol.from_dict(protocol_cfg), spec.max_input_len, is_e,
                         check_query_mode(bench.get("query", "aware")))


def group_by_context(items: list, context_of) -> list:
    """`items` reordered so that those with identical context ids are adjacent (groups in first-seen order)."""
    groups: dict[tuple, list] = {}
    for item in items:
        groups.setdefault(tuple(context_of(item)), []).append(item)
    return [item for group in groups.values() for item in group]
