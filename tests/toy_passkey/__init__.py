"""A test-only benchmark living outside kvbench: find a pass key hidden in filler text. It is one class, registered
here; its config (configs/benchmark/toy_passkey.yaml) names this package, and a run finds the config through
`hydra.searchpath`. Nothing in kvbench names it."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from kvbench.benchmark import Benchmark, Prompt, Sample, register
from kvbench.config import POS_INT, STR
from kvbench.results import read_predictions

TASK = "passkey"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def _passkey(seed: int, index: int) -> str:
    return str(random.Random(seed * 1000 + index).randint(10000, 99999))


@register
@dataclass
class ToyPasskey(Benchmark):
    name = "toy_passkey"
    schema = {"samples": POS_INT, "repeats": POS_INT, "max_new_tokens": POS_INT, "query": STR}
    samples: int
    repeats: int
    max_new_tokens: int
    seed: int
    query: str = "aware"

    @classmethod
    def plan(cls, cfg, spec) -> "ToyPasskey":
        bench = cfg.benchmark
        return cls(bench.samples, bench.repeats, bench.max_new_tokens, cfg.seed, bench.get("query", "aware"))

    def settings(self) -> dict:
        return {"name": self.name, "repeats": self.repeats, "max_new_tokens": self.max_new_tokens,
                "seed": self.seed, "query": self.query}

    def selection(self) -> dict:
        return {"samples": self.samples}

    def select(self) -> list[Sample]:
        return [Sample(TASK, str(i), _passkey(self.seed, i)) for i in range(self.samples)]

    def prompts(self, todo, tokenizer, model):
        for sample in todo:
            depth = (int(sample.key) * 7) % (self.repeats + 1)
            context = FILLER * depth + f"The pass key is {sample.data}. Remember it. " + \
                FILLER * (self.repeats - depth)
            context_ids = tokenizer.encode(context)
            question_ids = tokenizer.encode(" What is the pass key? The pass key is", add_special_tokens=False)
            stops = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
            if self.query == "agnostic":
                yield sample, Prompt(context_ids, self.max_new_tokens, stops, question_ids=question_ids)
            else:
                yield sample, Prompt(context_ids + question_ids, self.max_new_tokens, stops)

    def record(self, sample, prompt, out, text) -> dict:
        return {"_id": sample.key, "passkey": sample.data, "pred": text, "score": float(sample.data in text),
                **out.log_fields()}

    def summarize(self, store) -> dict:
        wanted = {s.key for s in self.select()}
        records = [r for r in store.records(TASK) if r["_id"] in wanted]
        rows = [{"task": TASK, "id": r["_id"], "score": r["score"]} for r in records]
        mean = round(100 * sum(r["score"] for r in rows) / len(rows), 2) if rows else None
        return {"benchmark": self.name, "tasks": {TASK: mean}, "n": {TASK: len(rows)}, "avg": mean,
                "sample_scores": rows}

    @classmethod
    def sweep_work(cls, cfg) -> list[tuple[str, int, float, float]]:
        samples = int(cfg.benchmark.samples)
        tokens = 20.0 * (int(cfg.benchmark.repeats) + 1)
        return [(TASK, samples, tokens * samples, float(cfg.benchmark.max_new_tokens * samples))]

    @classmethod
    def rescore(cls, run_dir: Path) -> list[dict]:
        records = read_predictions(Path(run_dir) / "predictions" / f"{TASK}.jsonl")
        return [{"task": TASK, "id": r["_id"], "score": float(r["passkey"] in r["pred"])} for r in records]
