"""Needle-in-a-Haystack runs: one prediction line per (context length, depth) cell, resumable."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from kvbench.benchmark import Benchmark, Prompt, Sample, register
from kvbench.config import BOOL, NONNEG_INT, POS_INT, STR, optional
from kvbench.errors import KvbenchError
from kvbench.needle.haystack import Haystack, haystack_token_ids, load_haystack
from kvbench.needle.prompt import (NEEDLE, PROMPT_PRESETS, _validate_cell, build_context_ids,
                                   build_multi_context_ids, build_prompt_ids, build_session_ids,
                                   build_split_prompt_ids, context_lengths,
                                   depth_percents, needle_facts, needle_question, stop_token_ids)
from kvbench.needle.scoring import (cell_retrieval, heatmap_score, needle_sample_scores, retrieval_score,
                                    rouge_score_x10)
from kvbench.query import check_query_mode
from kvbench.results import read_predictions
from kvbench.sessions import check_session_answers, turn_scores

TASK = "needle"


def cell_key(length: int, depth: int) -> str:
    return f"{length}_{depth}"


@register
@dataclass
class NeedlePlan(Benchmark):
    name = "needle"
    key = "cell"
    sessions = True  # with multi_needle: one conversation per length, one needle asked per turn
    schema = {"haystack_dir": optional(STR), "prompt": STR, "buffer": NONNEG_INT,
              "max_new_tokens": optional(POS_INT), "query": STR, "multi_needle": BOOL, "session": BOOL,
              "session_answers": STR,
              "grid": {"start": POS_INT, "end": POS_INT, "step": POS_INT, "depths": POS_INT}}
    row_extras = {"retrieval": "retrieval"}
    summary_list = {"title": "Needle-in-a-Haystack (in percent)", "anchor": "needle",
                    "variants": ("Needles", {"multi-needle": "multi"}, "single"),
                    "note": "Score: the papers' heatmap score (share of the expected answer's words in the response). "
                            "Retrieval: share of cells whose response names the needle's key facts (what measures "
                            "retrieval)."}

    lengths: list[int]
    depths: list[int]
    haystack: Haystack
    prompt: str
    buffer: int
    max_new_tokens: int
    query: str = "aware"
    multi_needle: bool = False
    session: bool = False  # one conversation per length: needle i asked at turn i + 1 (multi_needle)
    session_answers: str = "gold"

    def protocol_name(self) -> str:
        return (f"needle_{self.prompt}" + ("_agnostic" if self.query == "agnostic" else "")
                + ("_multineedle" if self.multi_needle else "")
                + (f"_session{'' if self.session_answers == 'gold' else 'model'}" if self.session else ""))

    def cells(self) -> list[str]:
        return [cell_key(length, depth) for length in self.lengths for depth in self.depths]

    def selection(self) -> dict:
        return {"lengths": list(self.lengths), "depths": list(self.depths)}

    def check_tokenizer(self, tokenizer) -> None:
        """Checks that need the tokenizer, run before the model weights load: every length has room for the
        needle, and the chat preset has a chat template."""
        _validate_cell(min(self.lengths), 0, len(tokenizer.encode(NEEDLE, add_special_tokens=False)), self.buffer)
        if self.prompt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise KvbenchError("benchmark.prompt=chat needs a tokenizer with a chat template, and this one has "
                               "none; use benchmark.prompt=raw for base models")

    def settings(self) -> dict:
        # The grid is not a setting: a larger grid continues the same run, cells already done are kept.
        return {"name": "needle", "prompt": self.prompt, "buffer": self.buffer, "max_new_tokens": self.max_new_tokens,
                "haystack_files": len(self.haystack.files), "haystack_order_sha256": self.haystack.order_sha256,
                **({"query": self.query} if self.query != "aware" else {}),  # aware: the fingerprint of old runs
                **({"multi_needle": True, "depths": self.depths} if self.multi_needle else {}),
                **({"session": True, "session_answers": self.session_answers,
                    "turn_order": list(range(len(self.depths)))} if self.session else {})}  # needle per turn

    def select(self) -> list[Sample]:
        if self.session:  # one session per length: turn i + 1 asks needle i (at the i-th grid depth)
            return [Sample(TASK, str(length), length, turns=len(self.depths)) for length in self.lengths]
        return [Sample(TASK, cell_key(length, depth), (length, depth)) for length in self.lengths
                for depth in self.depths]

    def prompts(self, todo, tokenizer, model):
        haystack_ids = haystack_token_ids(tokenizer, self.haystack, max(self.lengths))
        stops = tuple(stop_token_ids(tokenizer))
        if self.session:
            yield from self.session_prompts(todo, tokenizer, haystack_ids, stops)
            return
        multi: dict[int, tuple[list[int], list[int]]] = {}  # length -> the K-needle haystack and needle starts
        for sample in todo:
            length, depth = sample.data
            needle = self.depths.index(depth) if self.multi_needle else 0
            if self.multi_needle:
                if length not in multi:
                    multi.clear()
                    multi[length] = build_multi_context_ids(tokenizer, haystack_ids, length, self.depths, self.buffer)
                context_ids, needle_index = multi[length][0], multi[length][1][needle]
            else:
                context_ids, needle_index = build_context_ids(tokenizer, haystack_ids, length, depth,
                                                              buffer=self.buffer)
            info = {"needle": needle, "needle_index": needle_index, "context_tokens": len(context_ids)}
            if self.query == "agnostic":  # the cells of one multi-needle haystack share its compressed cache
                split = build_split_prompt_ids(tokenizer, context_ids, self.prompt, needle=needle)
                yield sample, Prompt(split.context_ids, self.max_new_tokens, stops, question_ids=split.question_ids,
                                     info={**info, "input_tokens": len(split.input_ids)})
            else:
                input_ids = build_prompt_ids(tokenizer, context_ids, self.prompt, needle=needle)
                yield sample, Prompt(input_ids, self.max_new_tokens, stops,
                                     info={**info, "input_tokens": len(input_ids)})

    def session_prompts(self, todo, tokenizer, haystack_ids, stops):
        for sample in todo:
            context_ids, starts = build_multi_context_ids(tokenizer, haystack_ids, sample.data, self.depths,
                                                          self.buffer)
            session_context, turns = build_session_ids(tokenizer, context_ids, len(self.depths), self.prompt)
            yield sample, Prompt(session_context, self.max_new_tokens, stops, turns=turns,
                                 session_answers=self.session_answers,
                                 info={"needle_starts": starts, "context_tokens": len(context_ids)})

    def record_turn(self, sample, prompt, turn, out, text) -> dict:
        length, depth = sample.data, self.depths[turn]
        response = text.strip()
        needle_text, _, _, expected = needle_question(turn)
        return {"cell": cell_key(length, depth), "context_length": length, "depth_percent": depth,
                "turn": turn + 1, "session": sample.key, "context_tokens": prompt.info["context_tokens"],
                "needle_index": prompt.info["needle_starts"][turn], "needle": turn, "response": response,
                "answer_ids": list(out.token_ids), "score_rouge": rouge_score_x10(response, needle_text),
                "score": heatmap_score(response, expected=expected),
                "retrieval": retrieval_score(response, needle_facts(turn)), **out.log_fields()}

    def record(self, sample, prompt, out, text) -> dict:
        length, depth = sample.data
        info = prompt.info
        response = text.strip()
        needle_text, _, _, expected = needle_question(info["needle"])
        return {"cell": sample.key, "context_length": length, "depth_percent": depth,
                "input_tokens": info["input_tokens"], "context_tokens": info["context_tokens"],
                "needle_index": info["needle_index"], "response": response,
                "score_rouge": rouge_score_x10(response, needle_text),
                "score": heatmap_score(response, expected=expected),
                "retrieval": retrieval_score(response, needle_facts(info["needle"])), **out.log_fields(),
                **({"needle": info["needle"]} if self.multi_needle else {})}

    @classmethod
    def plan(cls, cfg, spec) -> "NeedlePlan":
        return plan_needle(cfg, spec)

    @classmethod
    def variant_parts(cls, bench) -> list[str]:
        return ["multineedle"] if bench.get("multi_needle", False) else []

    @classmethod
    def sweep_work(cls, cfg) -> list[tuple[str, int, float, float]]:
        grid = cfg.benchmark.grid
        lengths = context_lengths(grid.start, grid.end, grid.step)
        depths = len(depth_percents(grid.depths))
        cells = len(lengths) * depths
        return [(TASK, cells, float(sum(lengths) * depths), float(cfg.benchmark.max_new_tokens * cells))]

    @classmethod
    def samples_done(cls, out: Path, unit: str, cfg=None) -> int:
        """The cells of this grid found in the folder (with no cfg: every line)."""
        if cfg is None:
            return super().samples_done(out, unit)
        grid = cfg.benchmark.grid
        wanted = {cell_key(length, depth) for length in context_lengths(grid.start, grid.end, grid.step)
                  for depth in depth_percents(grid.depths)}
        cells = set()
        path = out / "predictions" / f"{TASK}.jsonl"
        if path.exists():
            with open(path, "rb") as handle:
                for line in handle:
                    try:
                        cells.add(json.loads(line)["cell"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn or foreign line: the run redoes that cell
        return len(wanted & cells)

    @classmethod
    def score_rows(cls, scores: dict) -> list[dict]:
        """One row, task 'needle', score in percent."""
        if "mean_score" not in scores:
            raise KvbenchError("lacks 'mean_score'; rescore the needle run")
        return [{"task": TASK, "score": 100.0 * float(scores["mean_score"]), "n": scores.get("n"), "length": None}]

    @classmethod
    def headline(cls, scores: dict) -> float | None:
        return scores.get("mean_score")

    @classmethod
    def summary_lines(cls, scores: dict) -> list[str]:
        value = scores.get("mean_score")
        lines = [] if value is None else \
            [f"  {'mean needle score':24s} {value:6.3f}  (n={scores.get('n')}; the papers' word overlap)"]
        if value is not None and scores.get("mean_retrieval") is not None:
            lines.append(f"  {'needle retrieval':24s} {scores['mean_retrieval']:6.3f}  (share of cells naming the "
                         f"needle's key facts)")
        return lines

    @classmethod
    def rescore(cls, run_dir: Path) -> list[dict]:
        return needle_sample_scores(read_predictions(Path(run_dir) / "predictions" / f"{TASK}.jsonl"))

    @classmethod
    def selected_rows(cls, rows, scores, selection):
        if selection.get("lengths") and selection.get("depths"):
            cells = {cell_key(length, depth) for length in selection["lengths"] for depth in selection["depths"]}
            rows = [r for r in rows if r["id"] in cells]
        mean = scores.get("mean_score")
        return rows, {TASK: scores.get("n")}, {TASK: None if mean is None else 100 * float(mean)}

    def summarize(self, store) -> dict:
        """The summary of exactly this grid's cells; cells of other grids in the folder are counted as also on
        disk."""
        wanted = set(self.cells())
        records = store.records(TASK, key="cell")  # each cell once
        chosen = [r for r in records if r["cell"] in wanted]
        summary = summarize_needle(chosen)
        summary["selection"] = self.selection()
        summary["also_on_disk"] = {TASK: len(records) - len(chosen)} if len(records) > len(chosen) else {}
        return summary


def summarize_needle(records: list[dict]) -> dict:
    """The run's summary: the mean heatmap score is what the papers report as accuracy / average score; the mean
    retrieval score is the share of cells whose answer names the needle's key facts (what measures retrieval)."""
    n = len(records)
    mean = sum(r["score"] for r in records) / n if n else None
    mean_rouge = sum(r["score_rouge"] for r in records) / n if n else None
    cells = [cell_retrieval(r) for r in records]
    retrieval = sum(cells) / n if n and None not in cells else None
    turns = {}
    if records and all("turn" in r for r in records):  # a session run: the scores per turn (turn 1 .. K)
        turns = {"turn_scores": turn_scores(records, lambda r: r["score"]),
                 "turn_retrieval": turn_scores(records, cell_retrieval)}
    return {"benchmark": "needle", "mean_score": mean, "mean_retrieval": retrieval, "mean_score_rouge": mean_rouge,
            "n": n, **turns,
            "sample_scores": needle_sample_scores(records)}


def plan_needle(cfg: DictConfig, spec=None) -> NeedlePlan:
    bench = cfg.benchmark
    if bench.prompt not in PROMPT_PRESETS:
        raise KvbenchError(f"benchmark.prompt={bench.prompt!r}: choose one of {', '.join(PROMPT_PRESETS)}")
    grid = bench.grid
    lengths = context_lengths(int(grid.start), int(grid.end), int(grid.step))
    if not lengths:
        raise KvbenchError(f"the needle grid {grid.start}..{grid.end} step {grid.step} has no context length")
    if int(grid.depths) > 101:  # rounded percents repeat beyond 101 depths: cells would run twice
        raise KvbenchError(f"benchmark.grid.depths={grid.depths}: at most 101 (one per whole percent)")
    depths = depth_percents(int(grid.depths))
    multi_needle = bool(bench.get("multi_needle", False))
    if bench.max_new_tokens is None:
        raise KvbenchError("benchmark.max_new_tokens is null; the needle test needs a number, e.g. 30 (its default)")
    if multi_needle:
        needle_question(len(depths) - 1)  # a clear error when the grid has more depths than distinct needles
    session = bool(bench.get("session", False))
    if session and not multi_needle:
        raise KvbenchError("benchmark.session=true needs questions that share a context: on needle, set "
                           "benchmark.multi_needle=true (one haystack per length, one needle asked per turn)")
    return NeedlePlan(lengths, depths, load_haystack(bench.haystack_dir), bench.prompt,
                      int(bench.buffer), int(bench.max_new_tokens), check_query_mode(bench.get("query", "aware")),
                      multi_needle, session, check_session_answers(bench.get("session_answers", "gold")))
