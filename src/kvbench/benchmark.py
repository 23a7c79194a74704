"""A benchmark is an object: what the pipeline, the sweep planner, the report and `sample_scores` ask of one.

A benchmark registers its class once, from its own package (`@register`), and its Hydra config names that module
(`benchmark.package`), so a benchmark that lives outside kvbench is found with no edit here. The class describes
the benchmark without a model (settings schema, run-name parts, sweep work, report rows, rescoring a run folder);
`plan(cfg, spec)` builds an instance for one command: its selection, prompts and scorer.

The sample loop is the pipeline's (`kvbench.pipeline.predict`): it takes the selection (`select()`, cheap: task
and key), skips the samples already on disk, asks `prompts(todo, ...)` for their token ids (context | question |
answer prefix, as `Prompt`), sends them to the engine and hands each answer to `record(...)`, which scores it and
returns its prediction line. A multi-turn session (`benchmark.session=true`, a benchmark with `sessions`) is one
`Sample` with `turns` set, whose `Prompt` carries the turns (`kvbench.requests.Turn`): each turn is scored and
written as it ends (`record_turn`, one prediction line per turn, naming its session in `session`), and a killed
session is asked again from its first unanswered turn, the recorded answers replayed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

from kvbench.errors import KvbenchError

# Run folders written before `benchmark.package` was recorded: their benchmarks are among these modules.
BUILTIN_MODULES = ("kvbench.longbench.runner", "kvbench.needle.runner", "kvbench.ruler.runner",
                   "kvbench.longgen.runner")


@dataclass(frozen=True)
class Sample:
    """One selected sample, before any tokenization: its predictions file (`task`) and id (`key`)."""

    task: str
    key: str
    data: Any = field(default=None, compare=False)  # the benchmark's own handle (the example, the grid cell)
    digest: str | None = None  # a prediction on disk with another digest was made on other data: refused
    turns: int = 0  # a session: its number of turns (its lines on disk carry `session` = key, `turn`, `answer_ids`)


@dataclass
class Prompt:
    """A sample's token ids and generation limits (the fields of `kvbench.requests.Request`)."""

    input_ids: list[int]  # the whole prompt; with `question_ids`, the context alone (query-agnostic)
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0
    question_ids: list[int] | None = None  # the question and answer prefix, prefilled after the compression
    info: dict = field(default_factory=dict)  # what `record` needs to know about how the prompt was built
    turns: tuple | None = None  # a session: `input_ids` is the shared context, then these `Turn`s in one conversation
    session_answers: str = "gold"  # what stays in the cache after each turn: the gold answer or the model's own


class Benchmark:
    """The interface. Class attributes and classmethods work from a config or a run folder; the instance that
    `plan` returns is one command's selection."""

    name: ClassVar[str]
    key: ClassVar[str] = "_id"  # the field of a prediction line that identifies its sample
    schema: ClassVar[dict] = {}  # benchmark.<key> -> kvbench.config kind (a dict: a nested section)
    sessions: ClassVar[bool] = False  # benchmark.session=true is supported (samples sharing a context, in turn)
    uses_protocol: ClassVar[bool] = False  # the `protocol` group shapes its prompts (named in runs, recorded)
    table_layout: ClassVar[dict | None] = None  # {part: ({category: [task, ...]}, papers' task list | None)}
    abbreviations: ClassVar[dict[str, str]] = {}  # task or category -> the papers' short column header
    papers_figures: ClassVar[bool] = False  # the report draws the papers' budget curve and score vs bytes for it
    row_extras: ClassVar[dict[str, str]] = {}  # report column -> per-sample field (fallback: scores.json `mean_<f>`)
    # A one-row-per-run benchmark's list in the report, beside its table: {"title", "anchor" (file stem), "note",
    # "variants": (column, {variant: label}, label otherwise)}; None: no list.
    summary_list: ClassVar[dict | None] = None
    # Tables of scores by a per-sample field, one per table part, beside the benchmark's tables (LongBench-E: by
    # input length): {"field": the sample_scores.jsonl column, "groups": its values in column order, "stem": the
    # file-name suffix, "title": the title suffix, "unit": a group's name in the notes, "note": the note on what a
    # cell is ({part}: the part's language, e.g. "English ")}; None: no such table.
    group_table: ClassVar[dict | None] = None

    # ---- one command ------------------------------------------------------------------------------------------
    @classmethod
    def plan(cls, cfg, spec) -> "Benchmark":
        """Validate `cfg.benchmark` and build this command's plan, before any model loads."""
        raise NotImplementedError

    def protocol_name(self) -> str:
        return self.name

    def settings(self) -> dict:
        """Every benchmark setting that changes predictions (part of the result folder's fingerprint)."""
        raise NotImplementedError

    def selection(self) -> dict:
        """What this command selects (recorded; not a setting: a larger selection continues a run)."""
        return {}

    def check_tokenizer(self, tokenizer) -> None:
        """Checks that need the tokenizer, run before the weights load."""

    def select(self) -> list[Sample]:
        """The selection, in run order (samples sharing a context next to each other)."""
        raise NotImplementedError

    def prompts(self, todo: list[Sample], tokenizer, model) -> Iterator[tuple[Sample, Prompt]]:
        """The prompts of the samples still to run (of one task), in the order to send them."""
        raise NotImplementedError

    def record(self, sample: Sample, prompt: Prompt, out, text: str) -> dict:
        """The scored prediction line of one answer (`out.log_fields()`: the engine's per-sample fields)."""
        raise NotImplementedError

    def record_turn(self, sample: Sample, prompt: Prompt, turn: int, out, text: str) -> dict:
        """The scored prediction line of a session's turn (0-based) as it ends: it carries `session` (the sample's
        key), `turn` (1-based) and `answer_ids` (the answer's token ids, replayed on resume)."""
        raise NotImplementedError

    def summarize(self, store) -> dict:
        """scores.json of exactly this selection (`sample_scores`: the per-sample rows)."""
        raise NotImplementedError

    # ---- without a model: run names, sweeps, reports, run folders ----------------------------------------------
    @classmethod
    def name_parts(cls, bench) -> list[str]:
        """Run-name parts of the benchmark's variants, in order: the query mode (a query-agnostic run never shares a
        folder), the benchmark's own variants (`variant_parts`), the session."""
        query = bench.get("query", "aware")
        return ([str(query)] if query != "aware" else []) + cls.variant_parts(bench) + session_part(bench)

    @classmethod
    def variant_parts(cls, bench) -> list[str]:
        """Run-name parts of a benchmark's own variants (the needle's `multineedle`), after the query mode."""
        return []

    @classmethod
    def sweep_work(cls, cfg) -> list[tuple[str, int, float, float]]:
        """The sweep's cost units: (predictions file, samples, prompt tokens, tokens to generate) per unit."""
        raise KvbenchError(f"benchmark {cls.name!r} cannot be swept (it defines no sweep_work)")

    @classmethod
    def samples_done(cls, out: Path, unit: str, cfg=None) -> int:
        """Samples of one sweep unit already in a result folder (default: lines of its predictions file)."""
        path = out / "predictions" / f"{unit}.jsonl"
        if not path.exists():
            return 0
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())

    @classmethod
    def score_rows(cls, scores: dict) -> list[dict]:
        """Report rows of a scores.json: {task, score (0..100), n, length}; default: `tasks`/`n`, or one block
        per context length when scored per length (`lengths`)."""
        lengths = scores.get("lengths") if isinstance(scores.get("lengths"), dict) else {None: scores}
        rows = []
        for length, part in lengths.items():
            tasks = part.get("tasks") if isinstance(part, dict) else None
            if not isinstance(tasks, dict):
                raise KvbenchError("lacks the 'tasks' mapping; rescore the run")
            counts = part.get("n") or {}
            rows += [{"task": task, "score": score, "n": counts.get(task),
                      "length": None if length is None else int(length)}
                     for task, score in tasks.items() if score is not None or length is None]
        return rows

    @classmethod
    def headline(cls, scores: dict) -> float | None:
        """The run's one number."""
        return scores.get("avg")

    @classmethod
    def summary_lines(cls, scores: dict) -> list[str]:
        """What a finished run prints below its per-task lines."""
        value = cls.headline(scores)
        return [] if value is None else [f"  {'average':24s} {value:6.2f}  (n={sum(scores.get('n', {}).values())})"]

    @classmethod
    def rescore(cls, run_dir: Path) -> list[dict]:
        """Per-sample score rows of a run folder, from its predictions (`python -m kvbench.sample_scores`)."""
        raise KvbenchError(f"cannot rebuild per-sample scores of benchmark {cls.name!r} here; rerun the same "
                           f"command (finished samples are kept)")

    @classmethod
    def selected_rows(cls, rows: list[dict], scores: dict, selection: dict) -> tuple[list[dict], dict, dict]:
        """The rows of the selection scores.json covers, with its counts and means per task (score points)."""
        tasks = scores.get("tasks") or {}
        return [r for r in rows if r["task"] in tasks], scores.get("n") or {}, tasks


def session_part(bench) -> list[str]:
    """The run-name part of a session run (`session`, `sessionmodel`): never a folder shared with other runs."""
    if not bench.get("session", False):
        return []
    return ["session" + ("" if bench.get("session_answers", "gold") == "gold" else "model")]


_REGISTRY: dict[str, type[Benchmark]] = {}


def register(cls: type[Benchmark], name: str | None = None) -> type[Benchmark]:
    """Register a benchmark class under its `name` (or another name: one class, several kinds)."""
    _REGISTRY[name or cls.name] = cls
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str, package: str | None = None) -> type[Benchmark]:
    """The class registered as `name`, importing `package` (the module that registers it) when needed."""
    if name not in _REGISTRY:
        for module in [package] if package else BUILTIN_MODULES:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise KvbenchError(f"benchmark {name!r}: benchmark.package={module} does not import ({err}); "
                                   f"fix the package name or PYTHONPATH") from None
    if name not in _REGISTRY:
        where = f" (benchmark.package={package} does not register it)" if package else ""
        raise KvbenchError(f"unknown benchmark {name!r}{where}; choose one of {', '.join(sorted(_REGISTRY))} "
                           f"or name its module in benchmark.package")
    return _REGISTRY[name]


def of_config(bench) -> type[Benchmark]:
    """The class of a composed `benchmark` config section."""
    return get(str(bench.name), bench.get("package"))


def of_run(run: dict) -> type[Benchmark]:
    """The class of a run folder's run.json."""
    bench = (run.get("config") or {}).get("benchmark") or {}
    return get(str(run.get("benchmark") or bench.get("name") or ""), bench.get("package"))


def grouped(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """Samples by task, tasks in first-seen order."""
    tasks: dict[str, list[Sample]] = {}
    for sample in samples:
        tasks.setdefault(sample.task, []).append(sample)
    return tasks
